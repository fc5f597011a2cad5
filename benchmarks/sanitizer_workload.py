"""A small forward + backward of every CUDA kernel (LSTM with projection and lengths, GRU, every
dtype), for compute-sanitizer. Exits non-zero on a wrong result as well."""
import torch
from torch.nn.utils.rnn import pack_sequence

import lstm_fused


def main():
    torch.manual_seed(0)
    device = "cuda"
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for module in (lstm_fused.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=3),
                       lstm_fused.GRU(5, 7, num_layers=2, bidirectional=True)):
            module = module.to(device, dtype)
            x = torch.randn(6, 3, 5, device=device, dtype=dtype, requires_grad=True)
            out, _ = module(x)
            out.float().sum().backward()
            packed = pack_sequence([torch.randn(n, 5, device=device, dtype=dtype) for n in (6, 2, 4)],
                                   enforce_sorted=False)
            out, _ = module(packed)
            out.data.float().sum().backward()
            assert torch.isfinite(x.grad).all()
    torch.cuda.synchronize()
    print("sanitizer workload done")


if __name__ == "__main__":
    main()
