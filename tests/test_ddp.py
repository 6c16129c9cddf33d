"""DistributedDataParallel under torchrun: two gloo ranks on CPU train to the single-process result.

Each rank takes half of the same global batch, so the losses agree to floating-point tolerance:
with accum_steps=2 each rank takes whole micro-batches (the balance loss included is the same),
with accum_steps=1 each rank takes half the rows (here without a balance loss, which is per rank).
Both runs also pause at step 3 and resume, so the ranks must agree on the checkpoint.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from moe_core import store
from moe_core.train import train
from moe_core.variants import resolve

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def cache(shared_cache):
    return shared_cache


SHORT = {"steps": 6, "checkpoint_every": 3, "eval_every": 3}
CONFIGS = [resolve("wide", "tiny", overrides={"train": {**SHORT, "accum_steps": 2}}),
           resolve("deep", "tiny", overrides={"train": {**SHORT, "balance_coef": 0.0}})]

DRIVER = r"""
import json, sys
from moe_core.__main__ import main
from moe_core.config import RunConfig
from moe_core.train import train

root, cache, *configs = sys.argv[1:]
for config in configs:
    cfg = RunConfig.from_dict(json.loads(config))
    assert train(cfg, root, cache, progress=False, stop_at=3) is None
    train(cfg, root, cache, progress=False)
main(["train", "--variant", "hash", "--profile", "tiny", "--steps", "2", "--run-root", root, "--cache-dir", cache,
      "--no-progress"])
"""


def losses(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], [r["val_loss"] for r in records if "val_loss" in r]


def test_two_gloo_ranks_match_one_process(tmp_path, cache):
    for cfg in CONFIGS:
        train(cfg, tmp_path / "one", cache, progress=False)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
           str(tmp_path / "two"), str(cache), *(json.dumps(cfg.to_dict()) for cfg in CONFIGS)]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    try:
        stdout, stderr = job.communicate(timeout=300)
    finally:
        if job.poll() is None:  # a hung job: stop torchrun and its workers together
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, stderr[-3000:]
    printed = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and json.loads(printed[0])["cached"] is False  # rank 0 alone reports
    for cfg in CONFIGS:
        one, two = store.run_dir(cfg, tmp_path / "one"), store.run_dir(cfg, tmp_path / "two")
        assert store.read_json(two / "results.json")["world_size"] == 2
        (train_one, val_one), (train_two, val_two) = losses(one), losses(two)
        assert len(train_one) == len(train_two) == cfg.train.steps and len(val_one) == len(val_two) == 2
        assert torch.allclose(torch.tensor(train_one), torch.tensor(train_two), rtol=1e-5, atol=0)
        assert torch.allclose(torch.tensor(val_one), torch.tensor(val_two), rtol=1e-5, atol=0)
        assert torch.allclose(torch.tensor(store.read_json(one / "val_batch_losses.json")),
                              torch.tensor(store.read_json(two / "val_batch_losses.json")), rtol=1e-5, atol=0)
        w1, w2 = load_file(one / "final.safetensors"), load_file(two / "final.safetensors")
        # atol: rounding after 6 AdamW steps of up to lr = 3e-3 each (a bias near zero differed by 1.2e-6)
        bad = {k: (w1[k] - w2[k]).abs().max().item() for k in w1 if not torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-5)}
        assert not bad, (cfg.variant, bad)
