import pytest
import torch

from shared import runtime


@pytest.mark.parametrize("value", ["tiny", "cpu", "gpu", " CPU "])
def test_known_profiles_accepted(monkeypatch, value):
    monkeypatch.setenv("LLM_PROFILE", value)
    assert runtime.get_profile() == value.strip().lower()


def test_unknown_profile_rejected_with_clear_message(monkeypatch):
    monkeypatch.setenv("LLM_PROFILE", "huge")
    with pytest.raises(ValueError) as err:
        runtime.get_profile()
    message = str(err.value)
    assert "huge" in message and "tiny" in message and "LLM_PROFILE" in message


def test_default_profile_follows_cuda(monkeypatch):
    monkeypatch.delenv("LLM_PROFILE", raising=False)
    expected = "gpu" if torch.cuda.is_available() else "cpu"
    assert runtime.get_profile() == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.get_profile() == "gpu"


def test_device_order(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert runtime.get_device() == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert runtime.get_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.get_device() == torch.device("cuda")
    assert runtime.get_device("cpu") == torch.device("cpu")


def test_set_seed_reproducible():
    runtime.set_seed(7)
    a = (torch.rand(3), torch.randn(2, 2))
    runtime.set_seed(7)
    b = (torch.rand(3), torch.randn(2, 2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_checkpoint_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    assert runtime.checkpoint_dir() == tmp_path / "ckpt"
    assert (tmp_path / "ckpt").is_dir()
