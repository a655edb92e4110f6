"""Run under torchrun with 2 processes (gloo): each rank takes its rows of one fixed batch,
computes the CLOP loss with features gathered across ranks, backpropagates, averages the
parameter gradients over ranks as DDP/DeepSpeed do, and saves everything to OUT/rank{R}.pt
(plus, from rank 0, the batch and the initial weights) for tests/test_clop_loss.py to
compare with one process on the whole batch.

    python -m torch.distributed.run --nproc_per_node 2 --master_port 29541 \\
        tests/scripts/two_rank_clop_loss.py OUT
"""

import os
import sys

import torch
import torch.distributed as dist

from clopdit_dist.models.clop import CLOP

B, LATENT, TEXT = 12, 8, 10
SPLITS = {"equal": (6, 6), "unequal": (5, 7)}


def fixed_batch():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, LATENT, generator=g, dtype=torch.float64)
    text = torch.randn(B, TEXT, generator=g, dtype=torch.float64)
    keys = torch.tensor([3, 1, 3, 0, 2, 1, 3, 4, 0, 5, 1, 2], dtype=torch.int64)  # repeats span both ranks
    return z, text, keys


def make_model(loss: str) -> CLOP:
    torch.manual_seed(1)
    return CLOP(text_dim=TEXT, latent_dim=LATENT, embed_dim=6, hidden=16, loss=loss).double()


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    z, text, keys = fixed_batch()
    results = {}
    for loss_name in ("infonce", "siglip"):
        for split, sizes in SPLITS.items():
            model = make_model(loss_name)
            init = {k: v.clone() for k, v in model.state_dict().items()}
            start = sum(sizes[:rank])
            rows = slice(start, start + sizes[rank])
            z_local = z[rows].clone().requires_grad_(True)
            t_local = text[rows].clone().requires_grad_(True)
            loss, metrics = model(z_local, t_local, keys[rows])
            loss.backward()
            grads = {}
            for name, p in model.named_parameters():
                g = p.grad.clone()
                dist.all_reduce(g)
                grads[name] = g / world
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            results[(loss_name, split)] = {
                "rows": (rows.start, rows.stop), "loss": loss.item(), "mean_loss": mean_loss.item() / world,
                "grads": grads, "z_grad": z_local.grad, "text_grad": t_local.grad, "metrics": metrics, "init": init}
    torch.save({"rank": rank, "world_size": world, "results": results, "batch": (z, text, keys)},
               os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
