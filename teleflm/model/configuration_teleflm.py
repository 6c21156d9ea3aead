"""Tele-FLM configuration: Llama's fields plus the four muP fields of the official checkpoints.

Self-contained (imports only transformers) because exports ship this file for `trust_remote_code`.
"""

from transformers import PretrainedConfig


class TeleFLMConfig(PretrainedConfig):
    """Configuration of a Tele-FLM decoder, with the field names and semantics of the official
    `config.json` (model_type "TeleFLM").

    muP fields, used only when `use_mup` is true:
      input_mult: multiplies the token embeddings before the first layer;
      output_mult, mup_scale_factor: the logits are `lm_head(norm(h)) * output_mult / mup_scale_factor`,
        where mup_scale_factor is the width multiplier over the muP proxy (hidden_size / base width);
      mup_depth_factor: the depth multiplier over the proxy (num_hidden_layers / base depth). Each
        block's attention and MLP branch is multiplied by 1 / mup_depth_factor before it joins the
        residual stream (CompleteP, arXiv 2505.01618, alpha = 1). 1.0, the default, is a model that is
        its own base depth: no multiplier, as every config before this field.
    """

    model_type = "TeleFLM"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 80000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pretraining_tp: int = 1,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        use_mup: bool = False,
        mup_scale_factor: float = 1.0,
        output_mult: float = 1.0,
        input_mult: float = 1.0,
        mup_depth_factor: float = 1.0,
        **kwargs,
    ):
        if num_key_value_heads is None:
            num_key_value_heads = num_attention_heads
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"TeleFLMConfig: hidden_size ({hidden_size}) is not divisible by num_attention_heads "
                f"({num_attention_heads})"
            )
        if num_attention_heads % num_key_value_heads != 0:
            raise ValueError(
                f"TeleFLMConfig: num_key_value_heads ({num_key_value_heads}) does not divide "
                f"num_attention_heads ({num_attention_heads})"
            )
        if hidden_act != "silu":
            raise ValueError(
                f"TeleFLMConfig: hidden_act {hidden_act!r} is not supported (Tele-FLM uses 'silu')"
            )
        if mup_scale_factor <= 0:
            raise ValueError(f"TeleFLMConfig: mup_scale_factor must be positive, got {mup_scale_factor}")
        if mup_depth_factor <= 0:
            raise ValueError(f"TeleFLMConfig: mup_depth_factor must be positive, got {mup_depth_factor}")
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) in (
            None,
            "dynamic",
        ):
            raise ValueError(
                f"TeleFLMConfig: rope_scaling {rope_scaling} needs a static 'rope_type' "
                "(linear, llama3, yarn, longrope)"
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.pretraining_tp = pretraining_tp
        self.rope_theta = rope_theta
        if rope_scaling is not None:  # transformers warns about the field when it is merely present
            self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.use_mup = use_mup
        self.mup_scale_factor = mup_scale_factor
        self.output_mult = output_mult
        self.input_mult = input_mult
        self.mup_depth_factor = mup_depth_factor
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def logit_scale(self) -> float:
        """The factor the readout is multiplied by (1 without muP)."""
        return self.output_mult / self.mup_scale_factor if self.use_mup else 1.0
