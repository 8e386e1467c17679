"""Main job placeholder until the model wrapper lands: a lightning-attention demo."""
import torch

import mm1_kernels as mk
from mm1_kernels.lightning.reference import lightning_recurrence


def main():
    torch.manual_seed(0)
    B, T, H, D = 2, 257, 8, 64
    q, k, v = (torch.nn.functional.silu(torch.randn(B, T, H, D)) for _ in range(3))
    slopes = mk.lightning_slopes(H, 39, 80)
    o, state = mk.lightning_attention(q, k, v, slopes, output_final_state=True)
    ref_o, ref_state = lightning_recurrence(q, k, v, slopes)
    err = ((o.double() - ref_o).norm() / ref_o.norm()).item()
    print(f"lightning_attention B={B} T={T} H={H} D={D}: relative error vs fp64 recurrence {err:.2e}")


if __name__ == "__main__":
    main()
