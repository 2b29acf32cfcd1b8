"""Checkpoints: round trips, refusal of crafted pickles, damaged and missing files, config mismatches."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from cbam_dsa import CBAMResidualDynamicSA
from cbam_dsa.checkpoint import CheckpointError, load_block, load_checkpoint, save_checkpoint

SUFFIXES = (".safetensors", ".pt")


class _MakesFolder:
    """Unpickling this object calls ``os.mkdir(path)``: the shape of a malicious checkpoint, but harmless."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _trained_block(**kwargs) -> CBAMResidualDynamicSA:
    """A block whose every parameter and buffer differs from its freshly built value."""
    torch.manual_seed(0)
    block = CBAMResidualDynamicSA(16, **kwargs)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p))
        if block.alpha is not None and not block.learnable_alpha:
            block.alpha.fill_(0.37)
        block.ca.temperature.fill_(1.7)
    return block


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"learnable_alpha": True, "alpha_init": 0.5},
        {"learnable_temperature": True, "ca_fusion": "sum", "sa_kernels": (5,), "sa_use_dilated": False},
        {"residual": False, "ca_gate": "hardsigmoid", "sa_gate": "hardsigmoid"},
    ],
    ids=["fixed-alpha", "learnable-alpha", "learnable-T-single-branch", "no-residual"],
)
def test_round_trip(tmp_path, suffix, kwargs):
    block = _trained_block(**kwargs)
    path = save_checkpoint(tmp_path / f"block{suffix}", block, block.get_config())
    state, config = load_checkpoint(path)
    assert config == block.get_config()
    assert state.keys() == block.state_dict().keys()

    loaded = load_block(path)
    for (name, expected), (name2, got) in zip(block.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert name == name2
        assert torch.equal(got, expected), name
    assert loaded.learnable_alpha == block.learnable_alpha
    if block.alpha is not None:
        expected_alpha = block.alpha.detach().item() if block.learnable_alpha else 0.37
        assert loaded.alpha.detach().item() == pytest.approx(expected_alpha)
    x = torch.randn(2, 16, 7, 9)
    assert torch.equal(loaded(x), block(x))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_load_block_applies_overrides(tmp_path, suffix):
    block = _trained_block()
    path = save_checkpoint(tmp_path / f"block{suffix}", block, block.get_config())
    loaded = load_block(path, return_maps=True)
    x = torch.randn(2, 16, 6, 6)
    out, ca, sa, fusion_w, router_w = loaded(x)
    torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-6)  # with maps: the same math, sums reordered
    assert (ca.shape, sa.shape, fusion_w.shape, router_w.shape) == ((2, 16, 1, 1), (2, 1, 6, 6), (2,), (2, 3))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_state_dict_without_config(tmp_path, suffix):
    block = _trained_block()
    path = save_checkpoint(tmp_path / f"bare{suffix}", block)
    state, config = load_checkpoint(path)
    assert config is None
    assert torch.equal(state["alpha"], block.alpha)
    with pytest.raises(CheckpointError, match="has no config"):
        load_block(path)


def test_bare_torch_save_state_dict_is_accepted(tmp_path):
    block = _trained_block()
    torch.save(block.state_dict(), tmp_path / "bare.pt")
    state, config = load_checkpoint(tmp_path / "bare.pt")
    assert config is None
    assert all(torch.equal(state[k], v) for k, v in block.state_dict().items())


def test_tensors_sharing_storage_are_written_independently(tmp_path):
    base = torch.arange(6.0)
    save_checkpoint(tmp_path / "shared.safetensors", {"a": base, "b": base[2:4]})
    state, _ = load_checkpoint(tmp_path / "shared.safetensors")
    assert torch.equal(state["a"], base)
    assert torch.equal(state["b"], torch.tensor([2.0, 3.0]))


def test_config_that_is_not_json_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "x.pt", _trained_block(), {"bad": object()})
    assert not (tmp_path / "x.pt").exists()


def _crafted_payloads(marker: str) -> dict[str, bytes]:
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(2)}, "config": _MakesFolder(marker)}, buffer)
    return {"plain-pickle": pickle.dumps(_MakesFolder(marker), protocol=2), "torch-save-zip": buffer.getvalue()}


@pytest.mark.parametrize("kind", ["plain-pickle", "torch-save-zip"])
def test_crafted_pickle_is_refused_and_never_runs(tmp_path, kind):
    # The payload is live: an ordinary unpickler runs it.
    live_marker = tmp_path / "ran-with-plain-pickle"
    if kind == "plain-pickle":
        pickle.loads(_crafted_payloads(str(live_marker))[kind])
    else:
        torch.load(io.BytesIO(_crafted_payloads(str(live_marker))[kind]), weights_only=False)
    assert live_marker.is_dir()

    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    path.write_bytes(_crafted_payloads(str(marker))[kind])
    with pytest.raises(CheckpointError, match="was refused") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    assert "mkdir" in str(info.value)  # the message names what was refused
    with pytest.raises(CheckpointError, match="was refused"):
        load_block(path)
    assert not marker.exists()


def _garbage(tmp_path) -> dict[str, bytes]:
    block = _trained_block()
    real = save_checkpoint(tmp_path / "real.pt", block, block.get_config()).read_bytes()
    return {
        "empty": b"",
        "random": torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
        .numpy()
        .tobytes(),
        "text": b"this is not a checkpoint\n" * 20,
        "truncated": real[: len(real) // 2],
        "truncated-end": real[:-20],
    }


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("kind", ["empty", "random", "text", "truncated", "truncated-end"])
def test_garbage_files_raise_checkpoint_error(tmp_path, suffix, kind):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(_garbage(tmp_path)[kind])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_pickle_of_plain_values_is_not_a_state_dict(tmp_path):
    torch.save({"a": 1, "b": [2, 3]}, tmp_path / "values.pt")
    with pytest.raises(CheckpointError, match="does not hold a state_dict"):
        load_checkpoint(tmp_path / "values.pt")


def test_config_of_wrong_type_is_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "config": [1, 2]}, tmp_path / "cfg.pt")
    with pytest.raises(CheckpointError, match="config of type list"):
        load_checkpoint(tmp_path / "cfg.pt")


def test_safetensors_config_that_is_not_json(tmp_path):
    save_file({"w": torch.zeros(1)}, str(tmp_path / "bad.safetensors"), metadata={"cbam_dsa_config": "{oops"})
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_missing_file_and_folder(tmp_path, suffix):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / f"missing{suffix}")
    folder = tmp_path / f"folder{suffix}"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="not a file"):
        load_block(folder)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_config_mismatch(tmp_path, suffix):
    three_branches = _trained_block()
    one_branch = CBAMResidualDynamicSA(16, sa_kernels=(5,), sa_use_dilated=False)
    path = save_checkpoint(tmp_path / f"mismatch{suffix}", three_branches, one_branch.get_config())
    with pytest.raises(CheckpointError, match="does not match its config") as info:
        load_block(path)
    assert "\n" not in str(info.value)
    assert "sa.branches" in str(info.value)

    good = save_checkpoint(tmp_path / f"good{suffix}", three_branches, three_branches.get_config())
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_block(good, residual=False, alpha_init=1.0)  # drops the alpha the state holds
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_block(good, channels=32)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_config_the_block_refuses(tmp_path, suffix):
    block = _trained_block()
    config = {**block.get_config(), "ca_gate": "relu6"}
    path = save_checkpoint(tmp_path / f"refused{suffix}", block, config)
    with pytest.raises(CheckpointError, match=r"config the block refuses.*ca_gate"):
        load_block(path)
    path = save_checkpoint(tmp_path / f"unknown{suffix}", block, {**block.get_config(), "colour": "red"})
    with pytest.raises(CheckpointError, match="config the block refuses"):
        load_block(path)
