"""dicekern.distributed on 2 and 4 gloo ranks (CPU) equals the single-process engine to 1e-10:
dice_e (per hop, both curvature_at), cascade, final_influence, and the online ledger's node totals."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dicekern as dk
import dicekern.distributed as dkd
from conftest import TOL, assert_close, random_run
from dicekern.curvature.round import gossip_round

N, HOPS, SOURCE = 7, 3, 5


OPTIMIZERS = {"sgd": dk.optim.SGD(), "momentum": dk.optim.SGD(momentum=0.9, weight_decay=0.01)}


def worker(rank: int, world: int, optimizer: str, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        run = random_run(N, rounds=HOPS + 1, seed=17, optimizer=OPTIMIZERS[optimizer])  # every rank builds the same run ...
        traj = run.trajectory
        model, loss_fn, spec = traj.objective.model, traj.objective.loss_fn, traj.optimizer
        rec = dkd.DistributedRecorder(model, loss_fn, N, optimizer=spec)
        mine = slice(rec.nodes.start, rec.nodes.stop)

        def rows(t: int) -> tuple[dict, tuple, dict]:
            """... and records only its own nodes: (params, batch arguments, keywords)."""
            rnd = traj[t]
            params = {k: v[mine] for k, v in traj.params(t).items()}
            batch = (rnd.inputs[mine], rnd.targets[mine], rnd.lr[mine], rnd.W) if rnd.has_batch else ()
            return params, batch, {"state": {k: v[mine] for k, v in rnd.state.items()}}

        for t in traj.steps:
            params, batch, keywords = rows(t)
            rec.record(t, params, *batch, **keywords)
        ledger = dkd.DistributedOnlineDICE(model, loss_fn, run.test, 2, num_nodes=N, q=run.q, optimizer=spec)
        stopped = dkd.DistributedOnlineDICE(model, loss_fn, run.test, 2, num_nodes=N, q=run.q, optimizer=spec)
        checkpoint = f"{out_file}.rank{rank}"
        for t in traj.steps:
            params, batch, keywords = rows(t)
            ledger.record(t, params, *batch, **keywords)
            stopped.record(t, params, *batch, **keywords)
            if t == 2:  # stop mid-run, save this rank's share, resume from it
                stopped.save(checkpoint)
                stopped = dkd.DistributedOnlineDICE.load(checkpoint, model, loss_fn, run.test, q=run.q, num_nodes=N)
        assert torch.equal(stopped.node_totals, ledger.node_totals) and stopped.scored_steps == ledger.scored_steps
        conventions = ("sender", "receiver") if spec.stateless else ("sender",)
        results = {"ledger": ledger.node_totals}
        for at in conventions:
            results[f"dice_e-{at}"] = dkd.dice_e(rec, 0, run.test, HOPS, q=run.q, curvature_at=at, per_hop=True)
        results["cascade"] = dkd.cascade(rec, 0, SOURCE, run.test, HOPS, q=run.q, samples=[1, 3])
        results["final"] = dkd.final_influence(rec, run.test, q=run.q)
        gathered = [None] * world
        dist.all_gather_object(gathered, {k: v.tolist() for k, v in results.items()})
        if rank == 0:
            errors = {}
            for at in conventions:
                whole = torch.cat([torch.tensor(g[f"dice_e-{at}"], dtype=torch.float64) for g in gathered], dim=1)
                expected = dk.dice_e(traj, 0, run.test, HOPS, q=run.q, curvature_at=at, per_hop=True)
                assert_close(whole, expected, TOL[torch.float64].op)
                errors[at] = (whole - expected).abs().max().item()
            single = dk.OnlineDICE(model, loss_fn, run.test, 2, q=run.q, optimizer=spec)
            for t in traj.steps:
                rnd = traj[t]
                single.record(t, traj.params(t), *((rnd.inputs, rnd.targets, rnd.lr, rnd.W) if rnd.has_batch else ()), state=rnd.state)
            totals = torch.cat([torch.tensor(g["ledger"], dtype=torch.float64) for g in gathered])
            assert_close(totals, single.node_totals, TOL[torch.float64].op)
            flow = torch.cat([torch.tensor(g["cascade"], dtype=torch.float64) for g in gathered], dim=1)
            assert_close(flow, dk.cascade(traj, 0, SOURCE, run.test, HOPS, q=run.q, samples=[1, 3]), TOL[torch.float64].op)
            final = torch.cat([torch.tensor(g["final"], dtype=torch.float64) for g in gathered], dim=1)
            assert_close(final, dk.final_influence(traj, run.test, q=run.q), TOL[torch.float64].op)
            with open(out_file, "w") as f:
                json.dump(errors, f)
        dist.barrier()  # no rank tears its gloo pairs down while rank 0 still checks: that aborted a rank now and then
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world, optimizer", [(2, "sgd"), (4, "momentum")], ids=["2ranks-sgd", "4ranks-momentum"])
def test_distributed_matches_single_process(world: int, optimizer: str, tmp_path) -> None:
    out_file = tmp_path / "result.json"
    mp.spawn(worker, args=(world, optimizer, str(tmp_path / "init"), str(out_file)), nprocs=world, join=True)
    expected = {"sender", "receiver"} if optimizer == "sgd" else {"sender"}
    assert json.loads(out_file.read_text()).keys() == expected


def test_a_rank_whose_round_does_not_replay_stops_every_rank(tmp_path) -> None:
    """The replay check compares every rank's rows after the exchange, and every rank raises."""
    mp.spawn(_mismatch_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    assert sorted(p.name for p in tmp_path.glob("out.*")) == ["out.0", "out.1"]


def _mismatch_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        run = random_run(N, rounds=2, seed=5)
        traj = run.trajectory
        rec = dkd.DistributedRecorder(traj.objective.model, traj.objective.loss_fn, N)
        mine = slice(rec.nodes.start, rec.nodes.stop)
        rnd = traj[0]
        rec.record(0, {k: v[mine] for k, v in traj.params(0).items()}, rnd.inputs[mine], rnd.targets[mine], rnd.lr[mine], rnd.W)
        following = {k: v[mine].clone() for k, v in traj.params(1).items()}
        if rank == 1:
            following["0.weight"][0] += 1e-3  # only rank 1's rows are off
        with pytest.raises(ValueError, match="round 1 is not the replay of round 0"):
            rec.record(1, following)
        open(f"{out_file}.{rank}", "w").close()
        dist.barrier()  # gloo can abort a rank whose peer tears down right after the last exchange
    finally:
        dist.destroy_process_group()


def test_node_blocks_cover_every_node_once() -> None:
    blocks = [dkd.node_block(7, r, 4) for r in range(4)]
    assert [list(b) for b in blocks] == [[0, 1], [2, 3], [4, 5], [6]]
    with pytest.raises(ValueError, match="at least as many nodes"):
        dkd.node_block(3, 0, 4)


def test_torchrun_example_trains_and_reports_every_node() -> None:
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
               "-m", "dicekern.apps.torchrun", "--rounds", "5", "--hops", "2", "--batch-size", "8"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "3 nodes, 5 rounds, DICE-E^(2) of rounds 0..3"
    totals = torch.tensor([float(line.split()[1]) for line in lines[2:]], dtype=torch.float64)
    assert_close(totals, _torchrun_example_in_one_process(3, rounds=5, hops=2, batch_size=8), 1e-4)  # printed with 5 digits


def _torchrun_example_in_one_process(n: int, *, rounds: int, hops: int, batch_size: int, lr: float = 0.1) -> torch.Tensor:
    """The node totals dicekern.apps.torchrun prints, from the same data, seeds and steps in one process."""
    node_indices, features, labels, test_indices = dk.examples.digits_split(n)
    x_all, y_all = torch.tensor(features), torch.tensor(labels)
    torch.manual_seed(0)
    model = dk.examples.mlp().double()
    ledger = dk.OnlineDICE(model, dk.losses.softmax_cross_entropy, (x_all[test_indices], y_all[test_indices]), hops)
    objective = ledger.recorder.objective
    theta = objective.layout.flatten({k: p.detach()[None] for k, p in model.named_parameters()}).expand(n, -1).clone()
    rngs = [np.random.default_rng(rank) for rank in range(n)]
    W, rates = dk.topology.exponential(n), torch.full((n,), lr, dtype=torch.float64)
    for t in range(rounds):
        batch = torch.tensor(np.stack([rng.choice(node_indices[rank], batch_size, replace=False) for rank, rng in enumerate(rngs)]))
        x, y = x_all[batch], y_all[batch]
        ledger.record(t, objective.layout.unflatten(theta), x, y, lr, W)
        theta = gossip_round(objective, dk.optim.SGD(), theta, {}, x, y, rates, W)[1]
    ledger.record(rounds, objective.layout.unflatten(theta))
    return ledger.node_totals


def _disagreeing_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    """Rank 1 is given other hops than rank 0: the ledger and dice_e raise on both ranks, naming hops."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        run = random_run(N, rounds=3, seed=9)
        traj = run.trajectory
        model, loss_fn = traj.objective.model, traj.objective.loss_fn
        hops = 2 if rank == 0 else 1
        ledger = dkd.DistributedOnlineDICE(model, loss_fn, run.test, hops, num_nodes=N)
        mine = slice(ledger.recorder.nodes.start, ledger.recorder.nodes.stop)
        r = traj[0]
        with pytest.raises(ValueError, match="DistributedOnlineDICE.record: the ranks were given different arguments \\(hops: rank 0 2, rank 1 1\\)"):
            ledger.record(0, {k: v[mine] for k, v in traj.params(0).items()}, r.inputs[mine], r.targets[mine], r.lr[mine], r.W)
        rec = dkd.DistributedRecorder(model, loss_fn, N)
        for t in traj.steps:
            r = traj[t]
            rec.record(t, {k: v[mine] for k, v in traj.params(t).items()}, *((r.inputs[mine], r.targets[mine], r.lr[mine], r.W) if r.has_batch else ()))
        with pytest.raises(ValueError, match="dicekern.distributed.dice_e: the ranks were given different arguments \\(hops:"):
            dkd.dice_e(rec, 0, run.test, hops)
        open(f"{out_file}.{rank}", "w").close()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ranks_given_different_arguments_all_raise(tmp_path) -> None:
    mp.spawn(_disagreeing_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    assert sorted(p.name for p in tmp_path.glob("out.*")) == ["out.0", "out.1"]


def _stopped_worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    run = random_run(N, rounds=3, seed=9)
    traj = run.trajectory
    rec = dkd.DistributedRecorder(traj.objective.model, traj.objective.loss_fn, N, timeout=3, replay_check="off")
    mine = slice(rec.nodes.start, rec.nodes.stop)
    for t in traj.steps:
        r = traj[t]
        rec.record(t, {k: v[mine] for k, v in traj.params(t).items()}, *((r.inputs[mine], r.targets[mine], r.lr[mine], r.W) if r.has_batch else ()))
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # a rank that stops answering
    start = time.monotonic()
    try:
        dkd.dice_e(rec, 0, run.test, 2)
        outcome = "no error"
    except TimeoutError as error:
        outcome = f"{time.monotonic() - start:.1f} {error}"
    with open(out_file, "w") as f:
        f.write(outcome)
    os._exit(0)  # the process group cannot be torn down with a stopped peer


def test_a_stopped_rank_cannot_hang_the_others(tmp_path) -> None:
    context = mp.get_context("spawn")
    out = tmp_path / "out"
    workers = [context.Process(target=_stopped_worker, args=(r, str(tmp_path / "init"), str(out))) for r in range(2)]
    for worker in workers:
        worker.start()
    workers[0].join(timeout=120)
    for worker in workers:
        worker.kill()
    seconds, message = out.read_text().split(" ", 1)
    assert float(seconds) < 30 and "did not answer within 3 s" in message
