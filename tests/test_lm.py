"""Decoder LMs: logits match tiny random Hugging Face GPT-2 / LLaMA / Qwen2 / Mistral / MPT /
GPT-NeoX models loaded from safetensors (padded batches included), the KV cache reproduces the full
forward, and loading errors name what is wrong."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import reference_models
from xattn_vlm.models import convert, layers
from xattn_vlm.models.config import lm_config
from xattn_vlm.models.lm import DecoderLM, Inserted, causal_mask

VOCAB, WIDTH, DEPTH, HEADS, MLP, MAX_LEN = 64, 32, 2, 4, 48, 32

# name -> (config class, model class, config kwargs); each model is built and saved once.
HF_MODELS = {
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(n_embd=WIDTH, n_layer=DEPTH, n_head=HEADS, n_inner=MLP, n_positions=MAX_LEN,
                  layer_norm_epsilon=1e-4)),
    "llama_gqa": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                  dict(num_key_value_heads=2,
                       rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "llama_tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                   dict(tie_word_embeddings=True)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(num_key_value_heads=1)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(num_key_value_heads=2, sliding_window=None)),
    "mpt": (transformers.MptConfig, transformers.MptForCausalLM,
            dict(d_model=WIDTH, n_heads=HEADS, n_layers=DEPTH, max_seq_len=MAX_LEN)),
    # 6 heads: ALiBi's slopes for a head count that is not a power of two are interleaved.
    "mpt_6_heads": (transformers.MptConfig, transformers.MptForCausalLM,
                    dict(d_model=48, n_heads=6, n_layers=DEPTH, max_seq_len=MAX_LEN)),
    # Pythia's layout: a quarter of each head rotates, attention and MLP in parallel.
    "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM,
                 dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                      intermediate_size=MLP, max_position_embeddings=MAX_LEN, rotary_pct=0.25,
                      rotary_emb_base=500.0, use_parallel_residual=True, layer_norm_eps=1e-4)),
    # RedPajama-INCITE's layout: the whole head rotates, sequential residual.
    "gpt_neox_sequential": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM,
                            dict(hidden_size=WIDTH, num_hidden_layers=DEPTH,
                                 num_attention_heads=HEADS, intermediate_size=MLP,
                                 max_position_embeddings=MAX_LEN, rotary_pct=1.0,
                                 use_parallel_residual=False)),
}
LLAMA_SHAPES = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                    intermediate_size=MLP, max_position_embeddings=MAX_LEN, rms_norm_eps=1e-5)


def _build_hf(name: str):
  config_cls, model_cls, kwargs = HF_MODELS[name]
  shapes = LLAMA_SHAPES if config_cls in (transformers.LlamaConfig, transformers.Qwen2Config,
                                          transformers.MistralConfig) else {}
  config = config_cls(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, **shapes, **kwargs)
  config._attn_implementation = "eager"
  torch.manual_seed(0)
  model = model_cls(config).eval()
  # HF's init (std 0.02, unit norms) makes near-zero logits; larger weights make parity meaningful.
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.3 if p.ndim > 1 else 0.5).add_(1.0 if p.ndim == 1 else 0.0)
  return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """name -> (HF model, folder it was saved to), built lazily so each test builds what it needs."""
  torch.set_num_threads(1)
  built = {}

  def get(name):
    if name not in built:
      model = _build_hf(name)
      folder = tmp_path_factory.mktemp(name)
      model.save_pretrained(folder)
      built[name] = (model, folder)
    return built[name]

  return get


def _padded_batch(length=10, seed=0):
  """ids [3, length]: a full row, a right-padded row and a left-padded row, with their masks."""
  ids = np.random.default_rng(seed).integers(1, VOCAB, (3, length)).astype(np.int32)
  mask = np.ones((3, length), np.int32)
  mask[1, -3:] = 0
  mask[2, :4] = 0
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.int32)
  return ids, mask, positions


def _hf_logits(model, ids, mask, positions) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions).long())
  return out.logits.float().numpy()


_forward = nnx.jit(lambda lm, ids, mask: lm(ids, mask))


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_logits_match_hugging_face_on_a_padded_batch(hf, name, attention):
  model, folder = hf(name)
  lm = convert.load_hf_lm(folder, attention=attention)
  ids, mask, positions = _padded_batch()
  ours = np.asarray(_forward(lm, jnp.asarray(ids), jnp.asarray(mask)))
  theirs = _hf_logits(model, ids, mask, positions)
  real = mask.astype(bool)
  assert np.abs(theirs[real]).max() > 1.0  # not a vacuous comparison
  # Float32 sums come out differently on different CPUs: 1.3e-5 apart on one host for mistral.
  np.testing.assert_allclose(ours[real], theirs[real], rtol=1e-5, atol=3e-5)


def test_config_mapping(hf):
  cfg = convert.lm_config_from_hf(convert.read_config(hf("llama_gqa")[1]))
  assert (cfg.family, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta) == ("llama", 2, 8, 500.0)
  assert not cfg.tie_word_embeddings and not cfg.attention_bias
  cfg = convert.lm_config_from_hf(convert.read_config(hf("qwen2")[1]))
  assert cfg.attention_bias and cfg.num_kv_heads == 1
  cfg = convert.lm_config_from_hf(convert.read_config(hf("gpt2")[1]))
  assert (cfg.family, cfg.mlp_dim, cfg.norm_eps, cfg.tie_word_embeddings) == ("gpt2", MLP, 1e-4,
                                                                               True)


def test_sliding_window_caps_max_length():
  hf_config = transformers.MistralConfig(vocab_size=VOCAB, sliding_window=16,
                                         **LLAMA_SHAPES).to_dict()
  assert convert.lm_config_from_hf(hf_config).max_length == 16
  hf_config = transformers.Qwen2Config(vocab_size=VOCAB, sliding_window=16,
                                       **LLAMA_SHAPES).to_dict()
  assert convert.lm_config_from_hf(hf_config).max_length == MAX_LEN  # use_sliding_window False


def test_unsupported_configs_raise():
  with pytest.raises(ValueError, match=r"model_type must be one of .*'gpt2'.*got 'bert'"):
    convert.lm_config_from_hf({"model_type": "bert"})
  llama = transformers.LlamaConfig(vocab_size=VOCAB, **LLAMA_SHAPES).to_dict()
  with pytest.raises(NotImplementedError, match="rope_type 'llama3'"):
    convert.lm_config_from_hf({**llama, "rope_parameters": {"rope_type": "llama3",
                                                             "rope_theta": 1e4}})
  with pytest.raises(NotImplementedError, match="attention_bias=True"):
    convert.lm_config_from_hf({**llama, "attention_bias": True})
  with pytest.raises(ValueError, match="lacks 'hidden_size'"):
    convert.lm_config_from_hf({k: v for k, v in llama.items() if k != "hidden_size"})


def test_missing_folder_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    convert.load_hf_lm(tmp_path / "nowhere")


def test_sharded_checkpoint_loads_into_an_existing_model(hf, tmp_path):
  model, folder = hf("llama_gqa")
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  index = json.loads((tmp_path / convert.SAFETENSORS_INDEX).read_text())
  assert len(set(index["weight_map"].values())) > 1
  existing = DecoderLM(convert.lm_config_from_hf(convert.read_config(folder)), rngs=nnx.Rngs(1))
  convert.load_hf_lm_weights(existing, tmp_path)
  ids, mask, _ = _padded_batch()
  sharded = _forward(existing, jnp.asarray(ids), jnp.asarray(mask))
  single = _forward(convert.load_hf_lm(folder), jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))


def test_shape_mismatch_names_the_tensor(hf, tmp_path):
  folder = hf("llama_gqa")[1]
  shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
  hf_config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**hf_config, "intermediate_size": MLP + 8}))
  with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight'.*\(48, 32\)"
                                       r".*\(56, 32\)"):
    convert.load_hf_lm(tmp_path)


def test_missing_tensor_names_it(hf):
  folder = hf("llama_tied")[1]
  cfg = convert.lm_config_from_hf(convert.read_config(folder))
  cfg.tie_word_embeddings = False
  untied = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
  with pytest.raises(KeyError, match="'lm_head.weight' not found"):
    convert.load_hf_lm_weights(untied, folder)
  with pytest.raises(KeyError, match="'model.embed_tokens.weight'.*not hold a llama-family"):
    convert.load_hf_lm_weights(untied, hf("gpt2")[1])


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "mpt_6_heads", "gpt_neox"])
def test_prefill_then_decode_matches_the_full_forward(hf, name, attention):
  lm = convert.load_hf_lm(hf(name)[1], attention=attention)
  # Row 1 is right-padded: its padding is decoded and must stay invisible; row 2 is left-padded.
  ids, mask, positions = (jnp.asarray(a) for a in _padded_batch(length=9, seed=1))
  full = np.asarray(_forward(lm, ids, mask))

  @nnx.jit
  def step(lm, ids, positions, mask, cache):
    hidden, cache = lm.forward_embeddings(lm.embed_tokens(ids), positions, mask, cache)
    return lm.logits(hidden), cache

  prompt = 6
  cache = lm.init_cache(batch_size=3, max_length=12)
  logits, cache = step(lm, ids[:, :prompt], positions[:, :prompt], mask[:, :prompt], cache)
  pieces = [np.asarray(logits)]
  for t in range(prompt, ids.shape[1]):
    logits, cache = step(lm, ids[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1], cache)
    pieces.append(np.asarray(logits))
  assert int(cache.index) == ids.shape[1]
  real = np.asarray(mask).astype(bool)
  np.testing.assert_allclose(np.concatenate(pieces, axis=1)[real], full[real], rtol=1e-5,
                             atol=1e-5)


def _tiny(family="llama", **kwargs):
  cfg = lm_config(family=family, vocab_size=VOCAB, num_layers=DEPTH, embed_dim=WIDTH,
                  num_heads=HEADS, num_kv_heads=2 if family == "llama" else None, mlp_dim=MLP,
                  max_length=16)
  return DecoderLM(cfg, rngs=nnx.Rngs(0), **kwargs)


def test_lengths_are_checked():
  lm = _tiny()
  with pytest.raises(ValueError, match="input length 17 exceeds the model's max_length 16"):
    lm(jnp.zeros((1, 17), jnp.int32))
  with pytest.raises(ValueError, match=r"cache max_length must be in \[1, 16\].*got 32"):
    lm.init_cache(1, 32)
  cache = lm.init_cache(1, 4)
  x = lm.embed_tokens(jnp.zeros((1, 5), jnp.int32))
  ones = jnp.ones((1, 5), jnp.int32)
  with pytest.raises(ValueError, match="input length 5 exceeds the cache's max_length 4"):
    lm.forward_embeddings(x, ones, ones, cache)
  with pytest.raises(ValueError, match=r"attention_mask must have shape \(1, 5\)"):
    lm.forward_embeddings(x, ones, ones[:, :4])


def test_before_block_hook_and_remat():
  lm = _tiny("gpt2")
  ids = jnp.arange(6, dtype=jnp.int32)[None]
  mask = jnp.ones_like(ids)
  seen = []

  @nnx.jit(static_argnums=2)
  def hidden(lm, ids, scale_before_block):
    def hook(i, h):
      seen.append(i)
      return h * (1 + i) if scale_before_block else h
    out, _ = lm.forward_embeddings(lm.embed_tokens(ids), layers.default_positions(mask), mask,
                                   inserted=Inserted(range(DEPTH), hook))
    return out

  assert not np.allclose(hidden(lm, ids, False), hidden(lm, ids, True))
  assert seen == list(range(DEPTH)) * 2

  grad = nnx.jit(nnx.grad(lambda lm, ids: lm(ids).std()))
  plain = grad(lm, ids)
  lm.remat = True
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(grad(lm, ids))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_materialize_gradient_is_the_identity_and_keeps_non_finite_gradients():
  x = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)

  def loss(x, scale, barrier):
    y = layers.materialize_gradient(x) if barrier else x
    return jnp.sum(jnp.sin(y) * scale)

  for scale in (2.0, jnp.nan, jnp.inf):
    plain, through = (jax.jit(jax.grad(loss), static_argnums=2)(x, scale, b) for b in (0, 1))
    np.testing.assert_array_equal(plain, through)
  np.testing.assert_array_equal(layers.materialize_gradient(x), x)


def test_params_have_logical_axes_and_dtypes():
  lm = nnx.eval_shape(lambda: _tiny(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
  for path, p in nnx.to_flat_state(nnx.state(lm, nnx.Param)):
    assert len(p.get_metadata()["out_sharding"]) == len(p.get_value().shape), path
    assert p.get_value().dtype == jnp.bfloat16, path
  assert lm.blocks[0].attn.query.kernel.get_metadata()["out_sharding"] == ("embed", "heads", "kv")
  assert lm.lm_head.kernel.get_metadata()["out_sharding"] == ("embed", "vocab")

  def forward(lm, ids):
    hidden, _ = lm.forward_embeddings(lm.embed_tokens(ids), ids, jnp.ones_like(ids))
    return hidden, lm.logits(hidden)

  hidden, logits = nnx.eval_shape(forward, lm, jnp.zeros((1, 3), jnp.int32))
  assert (hidden.dtype, logits.dtype) == (jnp.bfloat16, jnp.float32)


@pytest.mark.parametrize("name, reference", [
    ("gelu", torch.nn.GELU()), ("gelu_new", torch.nn.GELU(approximate="tanh")),
    ("gelu_pytorch_tanh", torch.nn.GELU(approximate="tanh")), ("silu", torch.nn.SiLU()),
    ("relu", torch.nn.ReLU())])
def test_activations_match_pytorch(name, reference):
  x = np.linspace(-12.0, 12.0, 4001, dtype=np.float32)
  ours = np.asarray(layers.activation(name)(jnp.asarray(x)))
  np.testing.assert_allclose(ours, reference(torch.from_numpy(x)).numpy(), rtol=0, atol=2e-6)


def test_mpt_and_gpt_neox_config_mapping(hf):
  cfg = convert.lm_config_from_hf(convert.read_config(hf("mpt_6_heads")[1]))
  assert (cfg.family, cfg.num_heads, cfg.head_dim, cfg.mlp_dim) == ("mpt", 6, 8, 4 * 48)
  assert (cfg.alibi_bias_max, cfg.tie_word_embeddings, cfg.attention_bias) == (8.0, True, False)
  cfg = convert.lm_config_from_hf(convert.read_config(hf("gpt_neox")[1]))
  assert (cfg.family, cfg.rotary_fraction, cfg.rope_theta, cfg.parallel_residual) == (
      "gpt_neox", 0.25, 500.0, True)
  assert not cfg.tie_word_embeddings and cfg.attention_bias
  # Older config.json files name the rotary settings rotary_pct / rotary_emb_base.
  old = {"model_type": "gpt_neox", "vocab_size": VOCAB, "hidden_size": WIDTH,
         "num_hidden_layers": DEPTH, "num_attention_heads": HEADS, "intermediate_size": MLP,
         "max_position_embeddings": MAX_LEN, "rotary_pct": 0.5, "rotary_emb_base": 1000,
         "use_parallel_residual": False}
  cfg = convert.lm_config_from_hf(old)
  assert (cfg.rotary_fraction, cfg.rope_theta, cfg.parallel_residual) == (0.5, 1000, False)


def test_alibi_slopes_match_transformers():
  for heads in (4, 6, 12, 16):
    theirs = transformers.models.mpt.modeling_mpt.build_mpt_alibi_tensor(heads, 5, 8)
    slopes = theirs[:, 0, -2].numpy() * -1  # the bias one slot back is -m_h
    np.testing.assert_allclose(np.asarray(layers.alibi_slopes(heads, 8.0)), slopes, rtol=1e-6)
  # Powers of two: m_h = 2^(-8 (h + 1) / H).
  np.testing.assert_allclose(np.asarray(layers.alibi_slopes(4)), 2.0 ** (-2.0 * np.arange(1, 5)))


def test_fused_attention_equals_explicit_on_masked_biased_grouped_inputs():
  """``jax.nn.dot_product_attention`` (fused) and the jnp code (explicit): outputs and gradients
  within 1e-5 with 6 query heads over 2 key/value heads, a causal mask over left padding, a fully
  masked query row and ALiBi's bias, per head and per sample."""
  b, l, s, h, hkv, dh = 2, 5, 7, 6, 2, 8
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, l, h, dh))
  k, v = (jax.random.normal(key, (b, hkv, s, dh)) for key in keys[1:3])
  key_valid = jnp.ones((b, s), bool).at[1, :3].set(False)
  mask = causal_mask(key_valid, 2, l).at[1, 0].set(False)  # sample 1's first query sees nothing
  slopes = layers.alibi_slopes(h)
  bias = layers.alibi_bias(slopes, 2 + jnp.arange(l), jnp.arange(s))
  per_sample = bias[None] * jnp.array([1.0, 0.5])[:, None, None, None]
  cotangent = jax.random.normal(keys[3], (b, l, h, dh))
  for m, bi in ((None, None), (mask, None), (mask, bias), (mask[:1], per_sample)):
    def loss(q, k, v, attention):
      return (layers.attend(q, k, v, m, bi, attention=attention) * cotangent).sum()
    explicit = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, "explicit")
    fused = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, "fused")
    out = [layers.attend(q, k, v, m, bi, attention=a) for a in ("explicit", "fused")]
    assert np.isfinite(np.asarray(out[1])).all()
    np.testing.assert_allclose(np.asarray(out[1]), np.asarray(out[0]), rtol=1e-5, atol=1e-5)
    for theirs, ours in zip(jax.tree.leaves(fused), jax.tree.leaves(explicit)):
      np.testing.assert_allclose(np.asarray(theirs), np.asarray(ours), rtol=1e-5, atol=1e-5)
  # auto is one of the two, whatever the platform picks.
  auto = jax.jit(lambda q, k, v: layers.attend(q, k, v, mask, bias))(q, k, v)
  explicit = layers.attend(q, k, v, mask, bias, attention="explicit")
  np.testing.assert_allclose(np.asarray(auto), np.asarray(explicit), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="config.model.attention: expected one of"):
    layers.attend(q, k, v, mask, attention="flash")
  with pytest.raises(ValueError, match="config.model.attention: expected one of"):
    _tiny(attention="flash")


def test_partial_rotary_leaves_the_rest_of_each_head():
  x = jax.random.normal(jax.random.key(0), (1, 3, 2, 8))
  positions = jnp.array([[0, 3, 7]])
  rotated = layers.apply_rope(x, positions, 100.0, rotary_dim=4)
  np.testing.assert_array_equal(np.asarray(rotated[..., 4:]), np.asarray(x[..., 4:]))
  np.testing.assert_allclose(np.asarray(rotated[..., :4]),
                             np.asarray(layers.apply_rope(x[..., :4], positions, 100.0)),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="rotary_dim must be even"):
    layers.apply_rope(x, positions, 100.0, rotary_dim=3)


def test_mosaic_gpt_layout_with_full_width_qk_layernorm(tmp_path):
  """MPT-1B's MosaicGPT folder (its names, attn_qk_ln): logits match a torch MPT whose fused
  Wqkv is followed by LayerNorms of q and k over the whole d_model (``reference_models``)."""
  torch.manual_seed(0)
  reference = reference_models.tiny_lm("mosaic_gpt", tmp_path)
  lm = convert.load_hf_lm(tmp_path)
  assert lm.cfg.qk_norm and lm.blocks[0].attn.q_norm.bias is None
  assert lm.cfg.vocab_size == reference_models.PADDED_VOCAB
  ids, mask, positions = _padded_batch()
  ours = np.asarray(_forward(lm, jnp.asarray(ids), jnp.asarray(mask)))
  theirs = _hf_logits(reference, ids, mask, positions)
  real = mask.astype(bool)
  assert np.abs(theirs[real]).max() > 1.0
  np.testing.assert_allclose(ours[real], theirs[real], rtol=1e-5, atol=1e-5)


def test_qk_layernorm_is_over_the_full_width():
  """One attention layer with qk_norm against a direct torch computation of MosaicGPT's rule:
  LayerNorm of q and of k over all of d_model (not per head), then heads, ALiBi and softmax."""
  cfg = lm_config(family="mpt", vocab_size=VOCAB, num_layers=1, embed_dim=WIDTH, num_heads=HEADS,
                  mlp_dim=MLP, max_length=8, qk_norm=True)
  lm = DecoderLM(cfg, rngs=nnx.Rngs(3))
  attn = lm.blocks[0].attn
  for norm in (attn.q_norm, attn.k_norm):
    norm.scale[...] = jax.random.normal(jax.random.key(4), norm.scale.shape)
  x = jax.random.normal(jax.random.key(5), (1, 5, WIDTH))
  bias = layers.alibi_bias(layers.alibi_slopes(HEADS), jnp.arange(5), jnp.arange(5))
  mask = causal_mask(jnp.ones((1, 5), bool), 0, 5)
  ours = np.asarray(attn(x, jnp.zeros((1, 5), jnp.int32), mask, bias=bias)[0])

  t = lambda a: torch.tensor(np.asarray(a, np.float32))
  xt = t(x)[0]
  q = xt @ t(attn.query.kernel[...]).reshape(WIDTH, -1)
  k = xt @ t(attn.key.kernel[...]).reshape(WIDTH, -1)
  v = xt @ t(attn.value.kernel[...]).reshape(WIDTH, -1)
  q = torch.nn.functional.layer_norm(q, (WIDTH,), t(attn.q_norm.scale[...]), eps=1e-5)
  k = torch.nn.functional.layer_norm(k, (WIDTH,), t(attn.k_norm.scale[...]), eps=1e-5)
  heads = lambda a: a.reshape(5, HEADS, -1).transpose(0, 1)
  scores = heads(q) @ heads(k).transpose(1, 2) / np.sqrt(WIDTH // HEADS) + t(bias)
  scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
  out = (scores.softmax(-1) @ heads(v)).transpose(0, 1).reshape(5, WIDTH)
  out = out @ t(attn.out.kernel[...]).reshape(-1, WIDTH)
  np.testing.assert_allclose(ours[0], out.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, match", [
    ({"attn_config": {"clip_qkv": 6.0}}, r"attn_config\.clip_qkv=6\.0 \(supported: null\)"),
    ({"attn_config": {"softmax_scale": 0.1}}, r"attn_config\.softmax_scale=0\.1"),
    ({"logit_scale": 2.0}, r"logit_scale=2\.0"),
    ({"attn_config": {"alibi": False}}, r"attn_config\.alibi=False"),
    ({"no_bias": False}, r"no_bias=False"),
])
def test_unsupported_mpt_settings_raise(change, match):
  hf_config = {**transformers.MptConfig(d_model=WIDTH, n_heads=HEADS, n_layers=DEPTH,
                                        vocab_size=VOCAB).to_dict(), **change}
  with pytest.raises(NotImplementedError, match=match):
    convert.lm_config_from_hf(hf_config)
  mosaic = {**reference_models.MOSAIC_GPT_CONFIG, "attn_clip_qkv": 8.0}
  with pytest.raises(NotImplementedError, match=r"mosaic_gpt config.json sets attn_clip_qkv=8\.0"):
    convert.lm_config_from_hf(mosaic)
