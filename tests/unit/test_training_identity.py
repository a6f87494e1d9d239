"""training.identity: which model files a run may replace, and which saved state it may resume. Pure torch, real
files on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from comfyui_ip2p.dataset.records import EditRow
from comfyui_ip2p.training.identity import (
    RUN_ID_KEY,
    RunIdentity,
    check_resumable,
    claim_run,
    dataset_fingerprint,
    weights_fingerprint,
)
from safetensors.torch import save_file


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(320, 8, 3, 3, generator=gen),
            "proj.weight": torch.randn(640, 640, generator=gen), "proj.bias": torch.randn(640, generator=gen)}


def rows(count: int, text: str = "make it winter") -> list[EditRow]:
    return [EditRow(f"a photo {i}", text, f"a photo {i} in winter", None, None) for i in range(count)]


def test_a_new_name_gets_a_fresh_run_id(tmp_path: Path):
    first = claim_run(tmp_path / "m.safetensors", tmp_path / "run" / "run.json")
    second = claim_run(tmp_path / "m.safetensors", tmp_path / "run" / "run.json")
    assert first.run_id and first.run_id != second.run_id


@pytest.mark.parametrize("content", ["plain bytes", "foreign run id", "no metadata", "folder"])
def test_a_model_file_not_written_by_the_run_is_refused(tmp_path: Path, content: str):
    model, record = tmp_path / "m.safetensors", tmp_path / "run.json"
    record.write_text('{"run_id": "mine"}')
    if content == "plain bytes":
        model.write_bytes(b"the user's checkpoint")
    elif content == "folder":
        model.mkdir()
    else:
        metadata = {RUN_ID_KEY: "someone else"} if content == "foreign run id" else None
        save_file({"w": torch.zeros(2)}, str(model), metadata=metadata)
    with pytest.raises(ValueError, match="already exists and was not written by this training run; choose another "
                                         "checkpoint_name, or move or delete that file"):
        claim_run(model, record)


def test_a_file_the_pack_wrote_elsewhere_is_not_ours_without_the_run_record(tmp_path: Path):
    model = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(2)}, str(model), metadata=RunIdentity("abc").metadata())
    with pytest.raises(ValueError, match="already exists"):
        claim_run(model, tmp_path / "run.json")


def test_the_runs_own_file_is_claimed_with_its_run_id(tmp_path: Path):
    model, record = tmp_path / "m.safetensors", tmp_path / "run.json"
    identity = RunIdentity("abc")
    record.write_bytes(identity.record())
    save_file({"w": torch.zeros(2)}, str(model), metadata=identity.metadata())
    assert claim_run(model, record).run_id == "abc"


def test_the_weights_fingerprint_sees_other_weights_shapes_and_dense_changes():
    base = weights()
    assert weights_fingerprint(base) == weights_fingerprint({k: v.clone() for k, v in base.items()})
    other = weights_fingerprint(weights(seed=1))
    lora = {**base, "proj.weight": base["proj.weight"] + 1e-3 * torch.randn(640, 4) @ torch.randn(4, 640)}
    reshaped = {**base, "proj.bias": base["proj.bias"].reshape(2, 320)}
    renamed = {("x." + k): v for k, v in base.items()}
    prints = {weights_fingerprint(base), other, weights_fingerprint(lora), weights_fingerprint(reshaped),
              weights_fingerprint(renamed)}
    assert len(prints) == 5


def test_the_dataset_fingerprint_sees_place_size_and_contents(tmp_path: Path):
    here = dataset_fingerprint(tmp_path / "a", rows(3))
    assert here == dataset_fingerprint(tmp_path / "a", rows(3))
    assert len({here, dataset_fingerprint(tmp_path / "b", rows(3)), dataset_fingerprint(tmp_path / "a", rows(4)),
                dataset_fingerprint(tmp_path / "a", rows(3, "make it summer"))}) == 4


def test_resume_needs_the_same_model_and_dataset(tmp_path: Path):
    identity = RunIdentity("abc", {"model": "m1", "dataset": "d1"})
    state_path = tmp_path / "my_run" / "state.pt"
    check_resumable({"fingerprint": {"model": "m1", "dataset": "d1"}}, identity, state_path)
    with pytest.raises(ValueError, match=r"'my_run' .* was trained from a different model and dataset than the one "
                                         r"connected now; choose another checkpoint_name, or set resume off"):
        check_resumable({"fingerprint": {"model": "m2", "dataset": "d2"}}, identity, state_path)
    with pytest.raises(ValueError, match="a different dataset than"):
        check_resumable({"fingerprint": {"model": "m1", "dataset": "d2"}}, identity, state_path)
    with pytest.raises(ValueError, match="does not record which model and dataset"):
        check_resumable({"step": 3}, identity, state_path)


class Source(list):
    """A lazy dataset as dataset.source gives it: rows plus a fingerprint of its files."""

    def __init__(self, rows: list[EditRow], files: str) -> None:
        super().__init__(rows)
        self.files = files

    def fingerprint(self) -> str:
        return self.files


def test_the_dataset_fingerprint_sees_the_sources_files(tmp_path: Path):
    same = dataset_fingerprint(tmp_path / "a", Source(rows(3), "shards v1"))
    assert same == dataset_fingerprint(tmp_path / "a", Source(rows(3), "shards v1"))
    assert same != dataset_fingerprint(tmp_path / "a", Source(rows(3), "shards v2"))
