"""The ProtoNet meta-step of `benchmarks/protonet.py` written in PyTorch, to time it side by side.

The same computation as `metalearn.learners.protonet.ProtoNet` on the 4-block few-shot CNN with
`GradientOuterLoop`'s Adam: per episode, the support and query images go through
conv 3x3 ('same', no bias) -> batch norm -> ReLU -> 2x2 max-pool four times, batch norm takes
its statistics from the episode's support images only (and normalises the queries with them),
prototypes are the class means of the support embeddings, logits are minus squared distances,
the loss is the mean query cross-entropy over the episodes. Sampling is included, as in the JAX
step: every step draws fresh episodes (classes among the 4 rotations of every character,
distinct examples per class, pixels 1 - x/255) from the same image rows, with torch's generator.

Variants: eager NCHW, eager `channels_last`, and `torch.compile` of the channels_last step.
`check_equal` runs one batch of episodes through both frameworks from the same parameters and
returns the loss and largest gradient differences (the benchmark refuses to time a peer that
computes something else). PyTorch is only ever imported here, never by the package or its tests.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from _memory import peak_rss_mb, reset_peak_rss

BN_EPS = 1e-5


class TorchProtoNet:
    """ProtoNet on the few-shot CNN with Adam, in PyTorch; `step()` samples and trains once."""

    def __init__(self, rows: np.ndarray, examples: int, width: int, ways: int = 20,
                 shots: int = 1, queries: int = 15, batch: int = 8, lr: float = 1e-3,
                 channels_last: bool = False, compiled: bool = False, seed: int = 0,
                 params: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None):
        self.gen = torch.Generator().manual_seed(seed)
        self.rows = torch.from_numpy(np.ascontiguousarray(rows))  # [classes * examples, 784] u8
        self.m = examples
        self.classes = rows.shape[0] // examples
        self.ways, self.shots, self.queries, self.batch = ways, shots, queries, batch
        self.side = int(round(np.sqrt(rows.shape[1])))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if params is None:
            torch.manual_seed(seed)
            params, c_in = [], 1
            for _ in range(4):
                w = torch.randn(width, c_in, 3, 3) * np.sqrt(2.0 / (9 * c_in))
                params.append((w.numpy(), np.ones(width, np.float32),
                               np.zeros(width, np.float32)))
                c_in = width
        self.params = [(torch.tensor(w).contiguous(memory_format=self.memory_format)
                        .requires_grad_(), torch.tensor(g).requires_grad_(),
                        torch.tensor(b).requires_grad_()) for w, g, b in params]
        self.opt = torch.optim.Adam([p for blk in self.params for p in blk], lr=lr)
        self.loss_fn = torch.compile(self.loss) if compiled else self.loss

    def sample(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images [B*(S+Q), 1, H, W] (each episode's support first), support and query labels."""
        b, n, per = self.batch, self.ways, self.shots + self.queries
        cls = torch.rand(b, self.classes, generator=self.gen).argsort(-1)[:, :n]  # [B, N]
        ex = torch.rand(b, n, self.m, generator=self.gen).argsort(-1)[..., :per]  # [B, N, S+Q]
        idx = cls[..., None] * self.m + ex
        sup = idx[..., :self.shots].reshape(b, -1)  # [B, N*K], class-major
        qry = idx[..., self.shots:].reshape(b, -1)
        x = self.rows[torch.cat([sup, qry], 1).reshape(-1)].float().mul_(-1 / 255).add_(1)
        x = x.view(-1, 1, self.side, self.side).contiguous(memory_format=self.memory_format)
        labels = torch.arange(n)
        return (x, labels.repeat_interleave(self.shots).expand(b, -1),
                labels.repeat_interleave(self.queries).expand(b, -1))

    def loss(self, x: torch.Tensor, ys: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
        """Mean query cross-entropy of B episodes whose images are `x` (support first)."""
        b, s = ys.shape
        h = x
        for w, g, beta in self.params:
            h = F.conv2d(h, w, padding=1)
            e = h.unflatten(0, (b, -1))  # [B, S+Q, C, H, W]
            sup = e[:, :s]
            mean = sup.mean((1, 3, 4), keepdim=True)
            var = (sup - mean).square().mean((1, 3, 4), keepdim=True)
            e = (e - mean) * (g.view(1, 1, -1, 1, 1) * torch.rsqrt(var + BN_EPS)) \
                + beta.view(1, 1, -1, 1, 1)
            h = F.max_pool2d(F.relu(e.flatten(0, 1)), 2)
        emb = h.flatten(1).unflatten(0, (b, -1))  # [B, S+Q, D]
        onehot = F.one_hot(ys, self.ways).float()  # [B, S, N]
        protos = onehot.transpose(1, 2) @ emb[:, :s] / onehot.sum(1)[..., None]
        logits = -(emb[:, s:, None, :] - protos[:, None]).square().sum(-1)  # [B, Q, N]
        return F.cross_entropy(logits.flatten(0, 1), yq.reshape(-1))

    def step(self) -> float:
        """Sample a batch of episodes and take one Adam step; the loss."""
        loss = self.loss_fn(*self.sample())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())


def check_equal(data: dict, channels_last: bool = False) -> tuple[float, float]:
    """|loss difference| and the largest |gradient difference| between the JAX step's loss and
    gradients and this module's on the same episodes and CNN parameters. `data` (written by
    `benchmarks/protonet.py`) holds support_x/support_y/query_x/query_y [B, ...], per block i
    w{i} [3, 3, C_in, C_out], scale{i}, shift{i} and their JAX gradients dw{i}, dscale{i},
    dshift{i}, and the JAX loss."""
    blocks = range(sum(k.startswith("w") for k in data))
    params = [(data[f"w{i}"].transpose(3, 2, 0, 1), data[f"scale{i}"], data[f"shift{i}"])
              for i in blocks]
    support_y = data["support_y"]
    b = support_y.shape[0]
    peer = TorchProtoNet(np.zeros((1, 1), np.uint8), 1, 1, ways=int(support_y.max()) + 1,
                         shots=1, queries=1, batch=b, channels_last=channels_last,
                         params=params)
    x = np.concatenate([data["support_x"], data["query_x"]], 1)  # [B, S+Q, H, W, C]
    x = torch.from_numpy(np.ascontiguousarray(x.reshape(-1, *x.shape[2:]).transpose(0, 3, 1, 2)))
    loss = peer.loss(x.contiguous(memory_format=peer.memory_format),
                     torch.from_numpy(support_y.astype(np.int64)),
                     torch.from_numpy(data["query_y"].astype(np.int64)))
    loss.backward()
    worst = 0.0
    for i, (w, g, beta) in zip(blocks, peer.params, strict=True):
        for t, ref in ((w.grad.permute(2, 3, 1, 0), data[f"dw{i}"]),
                       (g.grad, data[f"dscale{i}"]), (beta.grad, data[f"dshift{i}"])):
            worst = max(worst, float(np.max(np.abs(t.numpy() - ref))))
    return abs(float(loss.detach()) - float(data["loss"])), worst

VARIANTS = ("eager", "channels_last", "compiled")


def time_peer(variant: str, rows: np.ndarray, examples: int, width: int, batch: int,
              steps: int = 10, warmup: int = 3) -> dict:
    """Median seconds per step of one variant (eager NCHW, channels_last, or compiled
    channels_last), after `warmup` steps (compilation included there)."""
    import time

    if variant not in VARIANTS:
        raise ValueError(f"unknown PyTorch variant {variant!r}; use one of {VARIANTS}")
    peer = TorchProtoNet(rows, examples, width, batch=batch,
                         channels_last=variant != "eager", compiled=variant == "compiled")
    t0 = time.perf_counter()
    for _ in range(warmup):
        peer.step()
    warm_s = time.perf_counter() - t0
    warm_peak = reset_peak_rss()
    times, loss = [], float("nan")
    for _ in range(steps):
        t = time.perf_counter()
        loss = peer.step()
        times.append(time.perf_counter() - t)
    return {"seconds_per_step": float(np.median(times)), "warmup_s": warm_s, "loss": loss,
            "peak_rss_mb": max(warm_peak, peak_rss_mb()), "stepping_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def main() -> None:
    """Time one variant in this process (nothing else in it); print a JSON line."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="npz from benchmarks/protonet.py")
    ap.add_argument("--variant", choices=VARIANTS, default="eager")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    with np.load(args.data) as f:
        rows, examples = f["rows"], int(f["examples"])
    rss0 = peak_rss_mb()
    r = time_peer(args.variant, rows, examples, args.width, args.batch, steps=args.steps)
    print(json.dumps({**r, "rss_before_mb": rss0}))

if __name__ == "__main__":
    main()
