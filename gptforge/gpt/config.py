"""The model's shape: one small dataclass, validated when it is made."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

MODELS = ("gpt", "bigram")
ACTIVATIONS = ("gelu_tanh", "gelu", "relu2")
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_bool(text: str) -> bool:
    """A yes/no from a command line (true/false, 1/0, yes/no, on/off); ValueError otherwise.
    The one word list of every command line here (gpt.sample, train)."""
    word = text.strip().lower()
    if word not in TRUE_WORDS + FALSE_WORDS:
        raise ValueError(f"expected true or false, got {text!r}")
    return word in TRUE_WORDS


@dataclass
class GPTConfig:
    model: str = "gpt"  # "gpt": the Transformer; "bigram": the lecture's baseline
    vocab_size: int = 65
    block_size: int = 128  # longest context the position embedding covers
    n_layer: int = 4  # defaults: a character model that trains on a laptop's CPU in minutes
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
    # options from the speedruns (modded-nanogpt), all off by default: the defaults are GPT-2's
    activation: str = "gelu_tanh"  # GPT-2's; "gelu": exact (nanoGPT's); "relu2": ReLU squared
    rope: bool = False  # rotary position embeddings in attention, instead of a learned position table
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention
    tie_embeddings: bool = True  # the output layer shares the token embedding's weights, as GPT-2
    zero_init_proj: bool = False  # projections into the residual stream (and an untied head) start at zero

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.rope and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rope needs an even head size, got n_embd // n_head = {self.n_embd // self.n_head}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                "each head gets n_embd // n_head channels"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**d)
