"""python -m mm1_model rl-demo: one CISPO step on the embedded tiny model, as a user writes it.

Rollouts come from the serving path (``generate(..., return_logprobs=True)``: varlen prefill,
then decode, sampling with M1's temperature 1.0 / top_p 0.95 through the FP32 head); the loss
from the training path (the cache-free forward, then ``mk.head_cispo_loss`` on the final hidden
states, no ``[T, V]`` tensor). Before the optimizer step it prints the loss, the reward and how
far the training engine's token logprobs are from the rollout engine's (docs/m1_math.md §6: the
mismatch the FP32 head exists to remove).

The task is a toy with a verifiable reward: a response earns the fraction of its tokens whose
parity is that of the sum of the prompt's tokens.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Optional

import torch

import mm1_kernels as mk

from .backends import op_backend
from .config import MiniMaxM1Config
from .generation import M1_TEMPERATURE, M1_TOP_P
from .modeling import MiniMaxM1ForCausalLM


def parity_reward(prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """The toy verifiable reward: fraction of response tokens with the parity of the prompt's sum.

    prompts ``[N, Tp]``, responses ``[N, n]`` int; returns fp32 ``[N]`` in [0, 1].
    """
    target = prompts.sum(1, keepdim=True) % 2
    return (responses % 2 == target).float().mean(1)


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(R - mean(R_group)) / std(R_group)`` per response (docs/m1_math.md §6); rewards are
    ``[P * G]``, grouped by prompt (rows ``p*G .. p*G + G-1``). A group whose rewards are all
    equal gets advantage 0 (it carries no signal), not 0/0."""
    r = rewards.view(-1, group_size)
    centered = r - r.mean(1, keepdim=True)
    std = r.std(1, keepdim=True)
    return torch.where(std > 0, centered / std.clamp_min(1e-12), torch.zeros_like(r)).view(-1)


def logprob_mismatch(train_lp: torch.Tensor, rollout_lp: torch.Tensor) -> dict:
    """max and mean |Δlogprob| and the Pearson correlation of the token probabilities."""
    a, b = train_lp.detach().double().flatten(), rollout_lp.detach().double().flatten()
    d = (a - b).abs()
    pearson = torch.corrcoef(torch.stack([a.exp(), b.exp()]))[0, 1].item() if a.numel() > 1 else 1.0
    return dict(max_abs=d.max().item(), mean_abs=d.mean().item(), pearson=pearson)


def cispo_step(model: MiniMaxM1ForCausalLM, optimizer: torch.optim.Optimizer, prompts: torch.Tensor,
               group_size: int, max_new_tokens: int,
               reward_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = parity_reward,
               generator: Optional[torch.Generator] = None, eps_low: Optional[float] = None,
               eps_high: float = 0.2, on_before_step: Optional[Callable[[dict], None]] = None) -> dict:
    """One CISPO step: G rollouts per prompt, rewards, group advantages, loss, optimizer step.

    prompts: ``[P, Tp]`` int (equal lengths). Returns a dict of floats: ``loss``, ``reward``
    (mean), ``grad_norm`` and the rollout-vs-training mismatch (``max_abs``, ``mean_abs``,
    ``pearson``), all measured before the step; ``on_before_step(stats)`` is called just
    before ``optimizer.step()`` (the demo prints there).
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (advantages are normalized within a group), got {group_size}")
    P, Tp = prompts.shape
    batch = prompts.to(model.device).repeat_interleave(group_size, 0)      # [P*G, Tp]
    seqs, old_lp = model.generate(batch, max_new_tokens=max_new_tokens, temperature=M1_TEMPERATURE,
                                  top_p=M1_TOP_P, generator=generator, return_logprobs=True)
    responses = seqs[:, Tp:]                                                # [P*G, n]
    rewards = reward_fn(batch, responses)
    adv = group_advantages(rewards, group_size)                             # [P*G]
    n = responses.shape[1]
    # Hidden state t predicts token t + 1: positions Tp-1 .. Tp+n-2 predict the response.
    hidden = model(seqs, return_logits=False, check_ids=False).hidden_states[:, Tp - 1:-1]
    loss, head = mk.head_cispo_loss(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight,
                                    responses.reshape(-1), old_lp.reshape(-1),
                                    adv.repeat_interleave(n), eps_low=eps_low, eps_high=eps_high,
                                    temperature=M1_TEMPERATURE, return_head=True,
                                    backend=op_backend("head_cispo_loss", model.backend))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
    stats = dict(loss=loss.item(), reward=rewards.mean().item(), grad_norm=grad_norm,
                 **logprob_mismatch(head.logprobs, old_lp.reshape(-1)))
    if on_before_step is not None:
        on_before_step(stats)
    optimizer.step()
    return stats


def build_model(seed: int = 0, backend: Optional[str] = None, device=None) -> MiniMaxM1ForCausalLM:
    """The embedded tiny model (as ``python -m mm1_model`` builds it on a CPU): fp32, random
    weights with O(1) activations from ``seed``."""
    model = MiniMaxM1ForCausalLM(MiniMaxM1Config.tiny(), backend=backend)
    return model.to(device or "cpu").init_random_(seed)


def trainable_parameters(model):
    """Parameters an optimizer should hold: int8 experts are frozen (``requires_grad=False``)."""
    return [p for p in model.parameters() if p.requires_grad]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mm1_model rl-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="torch", help="torch (default), triton, cuda")
    p.add_argument("--device", default=None, help="default: cuda when torch sees one, else cpu")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step (P)")
    p.add_argument("--group", type=int, default=8, help="rollouts per prompt (G)")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16, help="tokens per rollout")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eps-high", type=float, default=0.2, help="CISPO's upper clip 1 + eps_high")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = False

    t0 = time.perf_counter()
    model = build_model(args.seed, args.backend, device)
    opt = torch.optim.AdamW(trainable_parameters(model), lr=args.lr)
    g = torch.Generator(device=device).manual_seed(args.seed)
    cfg = model.config
    prompts = torch.randint(0, cfg.vocab_size, (args.prompts, args.prompt_len),
                            generator=torch.Generator().manual_seed(args.seed + 1))
    print(f"mm1_model rl-demo | backend {args.backend} | device {device}"
          f"{' | Triton through the interpreter' if mk.triton_interpret_enabled() else ''}\n"
          f"model: tiny M1-structured ({len(cfg.layer_ids)} layers, fp32, seed {args.seed}); "
          f"{args.prompts} prompts x G={args.group} rollouts x {args.new_tokens} tokens, "
          f"temperature {M1_TEMPERATURE}, top_p {M1_TOP_P}; reward: parity of the prompt's sum; "
          f"CISPO eps_high {args.eps_high}, AdamW lr {args.lr}")

    def report(s):
        print(f"  before the step: loss {s['loss']:+.5f}  reward {s['reward']:.3f}  grad norm "
              f"{s['grad_norm']:.3e}\n  rollout vs training logprobs: max |Δ| {s['max_abs']:.2e}  "
              f"mean |Δ| {s['mean_abs']:.2e}  Pearson(p) {s['pearson']:.9f} (1 - {1 - s['pearson']:.1e})")

    for step in range(args.steps):
        before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
        print(f"step {step + 1}/{args.steps}")
        cispo_step(model, opt, prompts, args.group, args.new_tokens, generator=g, eps_high=args.eps_high,
                   on_before_step=report)
        moved = max((p.detach() - b).abs().max().item() for p, b in zip(opt.param_groups[0]["params"], before))
        print(f"  AdamW step: max |Δparameter| {moved:.2e}")
    print(f"done in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
