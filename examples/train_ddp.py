"""Train a class-conditional U-Net on the 8x8 digits with several processes.

Run on one machine with N processes (GPUs if present, else CPU processes)::

    torchrun --nproc_per_node=2 examples/train_ddp.py --steps 2000

Each process trains on its share of the global batch (``--batch-size`` is the global batch);
DistributedDataParallel averages the gradients, so every rank holds the same weights and EMA.
Rank 0 writes the checkpoint (which resumes when the command is run again) and a grid of
guided samples.  ``cfmlib.train`` is the same function used on one device: it notices that
``torch.distributed`` is initialised.
"""
import argparse
import os

import torch
import torch.distributed as dist

import cfmlib
from cfmlib import checkpoint, models, solvers


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=256, help="global batch, split over the ranks")
    ap.add_argument("--base", type=int, default=32, help="U-Net channels at full resolution")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--amp", choices=["none", "bf16", "fp16"], default="bf16", help="autocast on CUDA only")
    ap.add_argument("--checkpoint", default="runs/digits_ddp.pt")
    ap.add_argument("--guidance", type=float, default=2.0, help="CFG weight w of the sample grid")
    args = ap.parse_args()

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank = dist.get_rank()
    try:
        torch.manual_seed(0)  # the initial weights; train() copies rank 0's to every rank anyway
        x, y = cfmlib.datasets.load_digits()
        model = models.UNet(tuple(x.shape[1:]), base=args.base, num_classes=10)
        result = cfmlib.train(model, (x, y), steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                              ema_decay=0.999, label_dropout=0.2, amp=False if args.amp == "none" else args.amp,
                              checkpoint=args.checkpoint, checkpoint_every=500, progress=True)
        if rank == 0:
            tail = result.history[-100:]
            print(f"world size {dist.get_world_size()}: {result.steps} steps in {result.seconds:.1f} s, "
                  f"mean loss of the last {len(tail)} steps {sum(tail) / max(len(tail), 1):.3f}")
            ema = checkpoint.load_model(args.checkpoint, map_location=next(result.ema.parameters()).device)
            labels = torch.arange(10, device=next(ema.parameters()).device).repeat_interleave(10)
            g = torch.Generator(device=labels.device).manual_seed(0)
            out = solvers.sample(models.guided(ema, args.guidance), len(labels), method="midpoint", steps=20,
                                 generator=g, y=labels)
            import matplotlib
            matplotlib.use("Agg")
            ax = cfmlib.plotting.image_grid(out.x.clamp(-1, 1), nrow=10, title=f"guided samples, w = {args.guidance}")
            png = os.path.splitext(args.checkpoint)[0] + "_samples.png"
            ax.figure.savefig(png, bbox_inches="tight")
            print(f"samples written to {png}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
