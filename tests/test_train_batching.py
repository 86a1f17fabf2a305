"""One global batch, split three ways, trains the same network: a batch of 2, two accumulated micro-batches of 1,
and two data-parallel processes (torchrun, gloo on CPU) with a batch of 1 each. Module dropout across processes
(different modules skipped on each) neither hangs nor lets the processes' networks drift apart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_worker import factors, fixed_draws_loss, two_image_dataset

from lorakit_ext.train.config import TrainConfig
from lorakit_ext.train.trainer import TrainHooks, build_network, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def adapter():
    torch.set_num_threads(1)
    from lorakit_ext.models.ldm import LdmAdapter
    from lorakit_ext.toy.model import load_toy_model

    return LdmAdapter(load_toy_model())


def _values(root: Path, **options) -> dict:
    values = dict(
        train_data_dir=str(two_image_dataset(root)),
        resolution=64,
        network_dim=4,
        network_alpha=4,
        network_train_unet_only=True,
        optimizer_type="torch.optim.SGD",  # updates linear in the gradients: what is compared is the gradient
        learning_rate=1.0,
        max_train_steps=2,
        save_precision="float",
        seed=3,
        output_dir=str(root / "out"),
        output_name="batching",
    )
    values.update(options)
    return values


def _train(adapter, values: dict) -> tuple[dict[str, torch.Tensor], list[float]]:
    config = TrainConfig.from_dict(values)
    torch.manual_seed(config.seed)
    network, _ = build_network(config, adapter)
    result = train(config, adapter, hooks=TrainHooks(network=network, batch_loss=fixed_draws_loss))
    return factors(network), result.losses


def _update_difference(got: dict, expected: dict, initial: dict) -> float:
    """Largest difference between two trained networks, relative to the largest change training made."""
    assert got.keys() == expected.keys()
    difference = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    update = max(float((expected[k] - initial[k]).abs().max()) for k in expected)
    print(f"difference {difference:.3g} of an update of {update:.3g}")
    return difference / update


@pytest.fixture(scope="module")
def one_batch_of_two(adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("batch2")
    values = _values(root, train_batch_size=2)
    torch.manual_seed(values["seed"])
    initial = factors(build_network(TrainConfig.from_dict(values), adapter)[0])
    trained, losses = _train(adapter, values)
    return trained, losses, initial


def test_accumulating_two_micro_batches_of_one_equals_one_batch_of_two(adapter, one_batch_of_two, tmp_path):
    expected, losses, initial = one_batch_of_two
    got, accumulated_losses = _train(adapter, _values(tmp_path, train_batch_size=1, gradient_accumulation_steps=2))
    assert accumulated_losses == pytest.approx(losses, rel=1e-5)  # the mean loss of each optimizer step
    # fp32, SGD: only the order of summations differs; measured 1.4e-6 of the update (~1 when the draws differ)
    assert _update_difference(got, expected, initial) <= 1e-4


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains_on_the_same_global_batch(one_batch_of_two, tmp_path):
    """torchrun --nproc_per_node 2 on CPU: the trainer's own accelerate setup, gloo all-reduce of one flat buffer."""
    base = _values(tmp_path, train_batch_size=1)
    configs = [dict(base, output_dir=str(tmp_path / "plain")), dict(base, output_dir=str(tmp_path / "dropout"),
                                                                   module_dropout=0.5)]
    (tmp_path / "configs.json").write_text(json.dumps(configs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "train_worker.py"), str(tmp_path / "configs.json"), str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for number in (0, 1):
        summaries = [json.loads((tmp_path / f"{number}-rank{r}.json").read_text()) for r in (0, 1)]
        assert [s["processes"] for s in summaries] == [2, 2] and [s["steps"] for s in summaries] == [2, 2]
        rank0, rank1 = (load_file(str(tmp_path / f"{number}-rank{r}.safetensors")) for r in (0, 1))
        assert rank0.keys() == rank1.keys()
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # one reduced gradient, the same update
    expected, _, initial = one_batch_of_two
    got = load_file(str(tmp_path / "0-rank0.safetensors"))
    assert _update_difference(got, expected, initial) <= 1e-4  # fp32, only the summation order differs
    with_dropout = load_file(str(tmp_path / "1-rank0.safetensors"))
    assert any(not torch.allclose(with_dropout[k], got[k]) for k in got)  # the dropout did skip modules
