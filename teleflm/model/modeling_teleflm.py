"""Tele-FLM: a Llama-shaped decoder with muP multipliers, in one file.

Pre-RMSNorm blocks, rotary position embeddings, grouped-query attention (SDPA), SwiGLU MLP, no biases,
untied embedding and readout. With `config.use_mup` the token embeddings are multiplied by `input_mult`,
the logits by `output_mult / mup_scale_factor` and each residual branch by `1 / mup_depth_factor`;
otherwise the model computes exactly Llama.

Self-contained (imports only torch and transformers) because exports ship this file for
`trust_remote_code`. State-dict keys are Llama's, so official checkpoints and vLLM load it as is.
"""

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

# Relative, as transformers' remote code expects (exports put this file beside configuration_teleflm.py);
# releases before 5 scan the file's imports as text and refuse an absolute import they cannot resolve.
from .configuration_teleflm import TeleFLMConfig

# What moved between the transformers releases this file supports (docs/model.md): here, the layer
# base class, DynamicCache's arguments, and (below) the name of the cache argument and output field.
try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # transformers < 4.52: the same hook, which gradient_checkpointing_enable() sets

    class GradientCheckpointingLayer(nn.Module):
        gradient_checkpointing = False

        def __call__(self, *args, **kwargs):
            if self.gradient_checkpointing and self.training:
                return self._gradient_checkpointing_func(super().__call__, *args, **kwargs)
            return super().__call__(*args, **kwargs)


def new_cache(config: TeleFLMConfig) -> DynamicCache:
    if "config" in inspect.signature(DynamicCache.__init__).parameters:  # transformers >= 4.56
        return DynamicCache(config=config)
    return DynamicCache()


class TeleFLMRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 whatever the compute dtype, as Llama does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class TeleFLMRotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE for the given positions. Scaled variants come from transformers' helpers."""

    def __init__(self, config: TeleFLMConfig):
        super().__init__()
        inv_freq, self.attention_scaling = self.compute_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @staticmethod
    def compute_inv_freq(config: TeleFLMConfig) -> tuple[torch.Tensor, float]:
        """RoPE inverse frequencies (fp32) and the cos/sin scaling of the configured rope type."""
        scaling = getattr(config, "rope_scaling", None) or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "default":
            dim = config.head_dim
            return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        return ROPE_INIT_FUNCTIONS[rope_type](config, None)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(
            x.dtype
        )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (batch, heads, seq, head_dim); cos/sin: (batch, seq, head_dim)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class TeleFLMAttention(nn.Module):
    def __init__(self, config: TeleFLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """`mask`: None (causal), a boolean/additive mask for SDPA, or a function (q, k, v) -> output
        that attends in its own way (e.g. within packed documents, where a dense mask is O(T^2))."""
        batch, seq, _ = x.shape
        # Head counts come from the weights, not the config, so that tensor parallelism (which shards
        # the projections) needs no change here.
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if callable(mask):
            out = mask(q, k, v)
        else:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=mask is None and seq > 1,
                enable_gqa=q.shape[1] != k.shape[1],
            )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class TeleFLMMLP(nn.Module):
    def __init__(self, config: TeleFLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TeleFLMDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: TeleFLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = TeleFLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = TeleFLMAttention(config, layer_idx)
        self.post_attention_layernorm = TeleFLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = TeleFLMMLP(config)
        # CompleteP's depth multiplier (1.0 unless set). Read with a default so that configs written
        # before the field existed load unchanged.
        depth_factor = getattr(config, "mup_depth_factor", 1.0) if config.use_mup else 1.0
        self.branch_scale = 1.0 / depth_factor

    def forward(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        h = h + self.branch_scale * self.self_attn(self.input_layernorm(h), rope, mask, cache)
        return h + self.branch_scale * self.mlp(self.post_attention_layernorm(h))


def attention_mask_for(
    attention_mask: torch.Tensor | None, batch: int, seq: int, past: int, device: torch.device
) -> torch.Tensor | None:
    """A boolean (batch, 1, seq, past + seq) mask, True where a query may attend, or None when plain
    causal attention over the whole sequence suffices (then SDPA runs its fused causal path).

    `attention_mask` is either transformers' 2-D padding mask (1 = real token), a ready 4-D mask
    (bool, or additive float), or an attention function (q, k, v) -> output, passed on as is."""
    if callable(attention_mask) or (attention_mask is not None and attention_mask.dim() == 4):
        return attention_mask
    if attention_mask is None or bool(attention_mask.all()):
        if past == 0 or seq == 1:  # fused causal path; or one query, which may see every cached key
            return None
        attention_mask = None
    q_pos = torch.arange(past, past + seq, device=device)
    k_pos = torch.arange(past + seq, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None].expand(batch, 1, seq, past + seq)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -(past + seq) :].bool()
    # A query with nothing to attend to (a left-pad position) would give NaN; let it see everything,
    # its output is never used.
    return mask | ~mask.any(dim=-1, keepdim=True)


# transformers 5.24 renamed the KV cache from `past_key_values` to `cache`, in `forward`'s arguments and
# in the output classes. The forwards take either name; outputs use the field the installed release has.
def cache_field(output_class: type) -> str:
    return "cache" if "cache" in getattr(output_class, "__dataclass_fields__", {}) else "past_key_values"


def with_cache(output_class: type, cache: Cache | None, **fields):
    return output_class(**fields, **{cache_field(output_class): cache})


def output_cache(output) -> Cache | None:
    return getattr(output, cache_field(type(output)))


class TeleFLMPreTrainedModel(PreTrainedModel):
    config_class = TeleFLMConfig
    config: TeleFLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TeleFLMDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # Plain (standard-parametrization) init; muP runs re-initialise with teleflm.mup.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, TeleFLMRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, TeleFLMRotaryEmbedding):
            # from_pretrained builds the model on the meta device and leaves non-persistent buffers
            # uninitialised: without this, RoPE would run on garbage frequencies.
            with torch.no_grad():
                module.inv_freq.copy_(module.compute_inv_freq(self.config)[0])


class TeleFLMModel(TeleFLMPreTrainedModel):
    """The decoder without readout: final-norm hidden states (for features / embeddings)."""

    def __init__(self, config: TeleFLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TeleFLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = TeleFLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = TeleFLMRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings with muP's input multiplier: the input of layer 0."""
        h = self.embed_tokens(input_ids)
        return h * self.config.input_mult if self.config.use_mup else h

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        past_key_values = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("TeleFLMModel: give exactly one of input_ids or inputs_embeds")
        # Embeddings given directly are taken as layer-0 input (input_mult already applied), as in vLLM.
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq = h.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = new_cache(self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=h.device)[None].expand(batch, seq)
        mask = attention_mask_for(attention_mask, batch, seq, past, h.device)
        rope = self.rotary_emb(h, position_ids)

        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(h)
            h = layer(h, rope, mask, past_key_values if use_cache else None)
        h = self.norm(h)
        if all_hidden is not None:
            all_hidden.append(h)
        return with_cache(
            BaseModelOutputWithPast,
            past_key_values if use_cache else None,
            last_hidden_state=h,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )


class TeleFLMForCausalLM(TeleFLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {}

    def __init__(self, config: TeleFLMConfig):
        super().__init__(config)
        self.model = TeleFLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from final-norm hidden states, with muP's output multiplier."""
        logits = self.lm_head(h)
        return logits * self.config.logit_scale if self.config.use_mup else logits

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        h = out.last_hidden_state
        logits = self.readout(h[:, -logits_to_keep:] if logits_to_keep else h)
        loss = None
        if labels is not None:
            # transformers' convention: labels are the inputs; position t predicts t + 1.
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return with_cache(
            CausalLMOutputWithPast,
            output_cache(out),
            loss=loss,
            logits=logits,
            hidden_states=out.hidden_states,
        )


__all__ = ["TeleFLMForCausalLM", "TeleFLMModel", "TeleFLMPreTrainedModel"]
