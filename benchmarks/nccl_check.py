"""A few DDP training steps with the nccl backend (one rank, one GPU): the fused LSTM trains under
DistributedDataParallel on CUDA and matches the same steps without DDP. Exits non-zero if not."""
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import lstm_fused


def train(model, steps=3):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 20, 16, generator=gen).cuda()
        y = torch.randn(8, 1, generator=gen).cuda()
        out, _ = model(x)
        loss = nn.functional.mse_loss(out[:, -1, :1], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def main():
    if not torch.cuda.is_available():
        sys.exit("nccl_check: no CUDA device")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{os.path.join(tmp, 'init')}", rank=0, world_size=1)
        torch.manual_seed(0)
        plain = lstm_fused.LSTM(16, 32, num_layers=2, batch_first=True).cuda()
        torch.manual_seed(0)
        wrapped = lstm_fused.LSTM(16, 32, num_layers=2, batch_first=True).cuda()
        loss_plain = train(plain)
        loss_ddp = train(DistributedDataParallel(wrapped))
        dist.destroy_process_group()
    for (name, a), (_, b) in zip(plain.named_parameters(), wrapped.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} differs after DDP training")
    print(f"nccl DDP check passed: final loss {loss_ddp:.5f} (without DDP {loss_plain:.5f})")


if __name__ == "__main__":
    main()
