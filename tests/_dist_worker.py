"""Worker of tests/test_scale.py: calibrate tiny models and write code fingerprints (rank 0).

Run in one process (``python _dist_worker.py OUT``) or under
``torchrun --standalone --nproc-per-node 2 _dist_worker.py OUT``; the test compares the two.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "golden"))
sys.path.insert(0, HERE)

#: name -> WaterSICConfig keyword arguments (besides bits / dataset / seqlen / nsamples).
CASES: dict[str, dict] = {
    # 5 batches: 3 on rank 0, 2 on rank 1; rate control makes the owners of q/k/v take turns.
    "default": {},
    # 3 batches (2 + 1); independent targets: the Linears of a group are solved at the same time;
    # the adaptive-eps search adds per-batch errors of both ranks in batch order.
    "batch2_adaptive_no_rate_control": {"batch_size": 2, "rate_control": False,
                                        "adaptive_eps": True, "adaptive_eps_steps": 1},
}
NSAMPLES, SEQLEN, VOCAB = 5, 16, 128


def main(out: str) -> None:
    from watersic_hf.integration.engine.distributed import init_from_environment

    torch.set_num_threads(1)
    comm = init_from_environment()
    import make_calib_codes as golden

    golden.NSAMPLES = NSAMPLES
    golden.CASES = {name: ("llama", extra) for name, extra in CASES.items()}
    result = {name: golden.fingerprint(name) for name in CASES}
    if comm is None or comm.rank == 0:
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)
        os.replace(tmp, out)
    if comm is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])


#: fp32 products of four batches whose fp64 sum depends on the order of the additions:
#: ((1e20 + 1) − 1e20) + 1 = 1 in batch order, but per-rank partial sums (1e20 + 1 = 1e20 and
#: −1e20 + 1 = −1e20) all-reduced give 0.
ORDER_SENSITIVE = [(1e10, 1e10), (1.0, 1.0), (1e10, -1e10), (1.0, 1.0)]


def chain_check(rank: int, world: int, port: int) -> None:
    """One rank of ``test_chain_reduce_adds_in_batch_order`` (``torch.multiprocessing.spawn``)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from watersic_hf.integration.engine.distributed import Communicator, shard_bounds
        from watersic_hf.integration.stats import MomentAccumulator

        comm = Communicator(rank, world, torch.device("cpu"))
        batches = [(torch.tensor([[u]]), torch.tensor([[v]])) for u, v in ORDER_SENSITIVE]
        one = MomentAccumulator(1, 1, "cpu")
        for u, v in batches:
            one.add(u, v)
        start, stop = shard_bounds(len(batches), world)[rank]
        mine = MomentAccumulator(1, 1, "cpu")

        def add_local() -> None:
            for u, v in batches[start:stop]:
                mine.add(u, v)

        if rank == 0:
            add_local()
        comm.chain_reduce([mine], add_local)
        assert mine.tokens == one.tokens == len(batches)
        assert torch.equal(mine.sum, one.sum), (mine.sum, one.sum)
        # The same batches summed per rank and all-reduced round differently.
        part = MomentAccumulator(1, 1, "cpu")
        for u, v in batches[start:stop]:
            part.add(u, v)
        dist.all_reduce(part.sum)
        assert not torch.equal(part.sum, one.sum), "the data no longer tell the orders apart"
    finally:
        dist.destroy_process_group()
