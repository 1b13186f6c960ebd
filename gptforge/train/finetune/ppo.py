"""The RL stage's loss: policy gradients over groups of completions, GRPO-style (no value network).

For each prompt the policy samples a group of G completions, each gets a reward r, and its
advantage is the reward against the group's:

    grpo       A = (r - mean(group)) / (std(group) + eps)      (zero when the group agrees)
    reinforce  A = r - mean(group)                             (the mean as baseline)

Every token of a completion shares its advantage. With the log-probabilities of the policy
being trained (logp), of the policy that sampled (old_logp, fixed for the step's updates) and
of the frozen starting model (ref_logp), per completion token:

    ratio = exp(logp - old_logp)
    grpo       loss = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + kl_coef * KL
    reinforce  loss = -logp * A + kl_coef * KL
    KL = exp(ref_logp - logp) - (ref_logp - logp) - 1     (k3: unbiased, always >= 0)

averaged over all completion tokens of the batch. On the first update of a step the ratio is
1 and GRPO's gradient is REINFORCE's with normalised advantages; later updates (--ppo_epochs)
reuse the same rollouts, and the clip keeps them near the policy that sampled them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ADVANTAGE_EPS = 1e-4  # keeps A finite when a group's rewards differ only slightly


def group_advantages(rewards: torch.Tensor, normalise: bool = True) -> torch.Tensor:
    """(P, G) rewards of P prompts' groups -> (P, G) advantages: centred on each group's mean
    and, with ``normalise``, scaled by its standard deviation; a group of equal rewards gets 0."""
    if rewards.dim() != 2 or rewards.size(1) < 2:
        raise ValueError(f"rewards must be (prompts, group) with a group of at least 2, got {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not normalise:
        return centred
    std = rewards.std(dim=1, keepdim=True)
    return torch.where(std > 0, centred / (std + ADVANTAGE_EPS), torch.zeros_like(centred))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probability of each target (B, T) under ``logits`` (B, T, V) at ``temperature``
    (the distribution the rollouts sampled from), and the entropy of each position's
    distribution; in float32 whatever the logits' precision."""
    logp_all = F.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # scalar, with gradients through logp
    kl: torch.Tensor  # mean KL per completion token (no gradient)
    clip_fraction: torch.Tensor  # share of tokens whose ratio was clipped (grpo)


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
    mask: torch.Tensor, kind: str = "grpo", clip_eps: float = 0.2, kl_coef: float = 0.0,
) -> PolicyLoss:
    """The mean loss over the completion tokens (``mask``) of a batch of sequences (B, T);
    ``advantages`` is one per sequence (B,). See the module docstring for the formulas."""
    mask = mask.float()
    count = mask.sum().clamp(min=1)
    adv = advantages.float().unsqueeze(1)
    log_ratio = logp - old_logp
    if kind == "grpo":
        ratio = log_ratio.exp()
        clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
        per_token = -torch.minimum(ratio * adv, clipped * adv)
        clip_fraction = (((ratio - 1).abs() > clip_eps).float() * mask).sum() / count  # outside the clip range
    elif kind == "reinforce":
        per_token = -logp * adv
        clip_fraction = torch.zeros((), device=logp.device)
    else:
        raise ValueError(f"unknown policy loss {kind!r}; expected grpo or reinforce")
    to_ref = ref_logp - logp
    kl = to_ref.exp() - to_ref - 1
    per_token = per_token + kl_coef * kl
    loss = (per_token * mask).sum() / count
    return PolicyLoss(loss, ((kl * mask).sum() / count).detach(), clip_fraction.detach())
