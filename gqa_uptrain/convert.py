"""MHA -> GQA conversion: pure functions from parameters to parameters (no I/O, no gin).

Head order (contiguous, as HF `repeat_kv`, Llama 2, Mistral): a joined kernel of width heads*head_dim is
head-major, and query head i uses key/value head i // (H / G). Converting from G0 key/value heads (G0 = H for MHA,
or an already grouped model) to G merges the G0 / G consecutive source KV heads j in [g*r, (g+1)*r), r = G0 / G,
into new KV head g; query heads keep their order, so query head i ends in group i // (H / G).

Methods (`METHODS`):
  mean    the paper (Ainslie et al. 2023, arXiv:2305.13245): average the K and V kernels of a group.
  first   paper ablation: keep the first head of each group.
  random  paper ablation: fresh T5X initialisation (variance scaling, fan_in, normal) of K/V with G heads.
  align   beyond the paper, after "Align Attention Heads Before Merging Them" (arXiv:2412.20677): rotate each
          source head by the orthogonal Procrustes rotation R_j that best maps its calibration keys (values) onto
          the first head of its group, folding R_j into the query kernels (q.k = qR.kR since T5 has no RoPE) and
          R_j^T into the out-projection rows (for V); the model function is unchanged. Then mean-pool.
  svd     beyond the paper, after "Effectively Compress KV Heads for LLM" (arXiv:2406.07056): per group, take the
          top-head_dim principal directions U [r*D, D] of the concatenated calibration keys [N, r*D]; the shared
          kernel is W_cat U and head j is reconstructed as k_g U_j^T, so U_j is folded into the query kernels of
          head j's queries (values: U_j^T into the out rows). By Eckart-Young the calibration K/V reconstruction
          error is never larger than mean pooling's (mean is one particular rank-D reconstruction).
Calibration activations (`collect_calibration`) are the inputs of each attention module's K/V projections from
the source model; without them `align` aligns the kernels themselves and `svd` uses identity inputs.

Optimizer state (`convert_moments`, `convert --carry-optimizer-state`): Adafactor's second moments v ~ E[g^2] of
the converted kernels follow the parameters by one rule for every method. Source head j is represented in the
converted model by the shared kernel of its group through the matrix T_j [D, D] folded into its queries (W_j ~
W'_g T_j^T; T_j = I for mean/first/random, the Procrustes rotation for align, the basis block U_j for svd; see
`kv_reconstruction_error`). The shared kernel therefore receives the sum of the gradients of the r = G0/G head
slots it replaces, mapped through T_j: g' = sum_j g_j T_j. Dropping the covariances (Adafactor keeps none) gives
    v'_g = sum_j v_j (T_j o T_j)            (o: elementwise square; rule "sum", the default)
and rule "mean" divides that by r (the group's average gradient scale). Query kernels get v_q,h (T_j o T_j) and
out rows (T_j o T_j)^T v_o,h, the diagonal transform of their parameter transform. `random` also uses the rule:
zeros with a carried step count would keep Adafactor's estimate biased low for ~step^0.8 steps (its decay
1 - (step + 1)^-0.8 is then close to 1), i.e. clipped full-size updates for that long. Factored statistics are
expanded to Adafactor's own rank-1 estimate, transformed and re-factored for the target shape.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from gqa_uptrain.config import ModelConfig

METHODS = ("mean", "first", "random", "align", "svd")
MOMENT_RULES = ("sum", "mean")  # how second moments of a group's K/V heads merge (module docstring)
DATA_METHODS = ("align", "svd")  # methods that use calibration activations
LAYER_CHOICES = ("decoder", "all")

# attention kind -> (ModelConfig field, module name inside a layer)
KINDS = {
    "encoder": ("encoder_kv_heads", "attention"),
    "decoder_self": ("decoder_self_kv_heads", "self_attention"),
    "decoder_cross": ("decoder_cross_kv_heads", "encoder_decoder_attention"),
}


@dataclasses.dataclass
class AttentionWeights:
    """One attention module: q [E, H*D], k/v [E, G*D], o [H*D, E] (our 2-D kernel layout)."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    o: np.ndarray


def kinds_for(layers: str) -> tuple[str, ...]:
    if layers not in LAYER_CHOICES:
        raise ValueError(f"--layers must be one of {LAYER_CHOICES}, got {layers!r}")
    return ("decoder_self", "decoder_cross") + (("encoder",) if layers == "all" else ())


def module_paths(config: ModelConfig, kind: str) -> list[str]:
    """Flat param prefixes of every attention module of a kind, e.g. 'decoder/layers_0/self_attention'."""
    stack = "encoder" if kind == "encoder" else "decoder"
    n = config.num_encoder_layers if stack == "encoder" else config.num_decoder_layers
    return [f"{stack}/layers_{i}/{KINDS[kind][1]}" for i in range(n)]


def current_kv_heads(config: ModelConfig, kind: str) -> int:
    return getattr(config, KINDS[kind][0]) or config.num_heads


def validate_target(config: ModelConfig, num_kv_heads: int, layers: str) -> None:
    """Raise ValueError unless every converted attention kind can go from its current KV heads to num_kv_heads."""
    h, g = config.num_heads, num_kv_heads
    if not isinstance(g, int) or g <= 0:
        raise ValueError(f"--num-kv-heads must be a positive integer, got {g!r}")
    divisors = [d for d in range(1, h + 1) if h % d == 0]
    if g > h:
        raise ValueError(f"--num-kv-heads {g} exceeds num_heads={h}; valid values are {divisors}")
    if h % g:
        raise ValueError(f"--num-kv-heads {g} does not divide num_heads={h}; valid values are {divisors}")
    for kind in kinds_for(layers):
        g0 = current_kv_heads(config, kind)
        if g0 % g:
            ok = [d for d in range(1, g0 + 1) if g0 % d == 0]
            raise ValueError(f"--num-kv-heads {g} does not divide the source's current {kind} key/value head count "
                             f"{g0} (the source is already grouped); valid values are {ok}")


def target_config(config: ModelConfig, num_kv_heads: int, layers: str) -> ModelConfig:
    changes = {KINDS[k][0]: num_kv_heads for k in kinds_for(layers)}
    return config.replace(**changes)


# ------------------------------------------------------------------------------------------- per-module math


def _heads(w: np.ndarray, n: int, d: int) -> np.ndarray:
    """[E, n*D] -> [n, E, D]."""
    return w.reshape(w.shape[0], n, d).transpose(1, 0, 2)


def _join(w: np.ndarray) -> np.ndarray:
    """[n, E, D] -> [E, n*D]."""
    return np.ascontiguousarray(w.transpose(1, 0, 2).reshape(w.shape[1], -1))


def _out_heads(o: np.ndarray, n: int, d: int) -> np.ndarray:
    """out kernel [n*D, E] -> [n, D, E]."""
    return o.reshape(n, d, o.shape[-1])


def fold_head_transforms(w: AttentionWeights, num_heads: int, head_dim: int, tk: np.ndarray,
                         tv: np.ndarray) -> AttentionWeights:
    """Apply per-KV-head matrices tk, tv [G0, D, D] on the query side: query heads of KV head j get
    W_q,h @ tk[j]; out rows of those heads become tv[j]^T @ W_o,h. K/V kernels are returned unchanged (the caller
    pairs this with W_k,j @ tk[j] / W_v,j @ tv[j] for orthogonal tk, or with a shared reconstruction)."""
    g0, d = tk.shape[0], head_dim
    per = num_heads // g0
    q = _heads(w.q, num_heads, d)
    o = _out_heads(w.o, num_heads, d)
    owner = np.arange(num_heads) // per
    q = np.einsum("hed,hdf->hef", q, tk[owner])
    o = np.einsum("hdf,hde->hfe", tv[owner], o)  # tv^T @ o: (tv^T)_{f d} o_{d e}
    return AttentionWeights(_join(q), w.k, w.v, np.ascontiguousarray(o.reshape(num_heads * d, -1)))


def _procrustes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Orthogonal R [D, D] minimising ||a R - b||_F for a, b [N, D] (Schoenemann 1966)."""
    u, _, vt = np.linalg.svd(a.T @ b)
    return u @ vt


def align_rotations(w: AttentionWeights, num_kv: int, num_groups: int, head_dim: int,
                    x: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Rotations rk, rv [G0, D, D] aligning each source KV head to the first head of its target group.

    x: calibration inputs of the K/V projections [N, E]; None aligns the kernels themselves (x = I).
    """
    d, r = head_dim, num_kv // num_groups
    k, v = _heads(w.k, num_kv, d), _heads(w.v, num_kv, d)
    if x is not None:
        k, v = np.einsum("ne,jed->jnd", x, k), np.einsum("ne,jed->jnd", x, v)
    eye = np.eye(d, dtype=np.float64)
    rk, rv = np.stack([eye] * num_kv), np.stack([eye] * num_kv)
    for j in range(num_kv):
        ref = (j // r) * r
        if j != ref:
            rk[j] = _procrustes(k[j].astype(np.float64), k[ref].astype(np.float64))
            rv[j] = _procrustes(v[j].astype(np.float64), v[ref].astype(np.float64))
    return rk, rv


def rotate_heads(w: AttentionWeights, num_heads: int, num_kv: int, head_dim: int, rk: np.ndarray,
                 rv: np.ndarray) -> AttentionWeights:
    """Function-preserving rotation: W_k,j R_j, W_q,h R_j (h in j's queries), W_v,j S_j, S_j^T W_o,h."""
    dt = w.k.dtype
    out = fold_head_transforms(w, num_heads, head_dim, rk.astype(dt), rv.astype(dt))
    k = np.einsum("jed,jdf->jef", _heads(w.k, num_kv, head_dim), rk.astype(dt))
    v = np.einsum("jed,jdf->jef", _heads(w.v, num_kv, head_dim), rv.astype(dt))
    return AttentionWeights(out.q, _join(k), _join(v), out.o)


def _pca_basis(y: np.ndarray, d: int) -> np.ndarray:
    """Top-d right singular vectors [C, d] of y [N, C] (uncentred: attention uses raw dot products)."""
    _, _, vt = np.linalg.svd(y, full_matrices=False)
    return vt[:d].T


def svd_merge(w: AttentionWeights, num_heads: int, num_kv: int, num_groups: int, head_dim: int,
              x: np.ndarray | None) -> tuple[AttentionWeights, np.ndarray, np.ndarray]:
    """Activation-aware low-rank sharing (see module docstring): K/V [E, G*D], query / out kernels absorb U_j.

    Returns (weights, uk, uv) with uk, uv [G0, D, D] the blocks U_j folded into the query / out kernels."""
    d, r, e = head_dim, num_kv // num_groups, w.k.shape[0]
    xx = np.eye(e, dtype=np.float64) if x is None else x.astype(np.float64)
    new_k, new_v = [], []
    uk_all, uv_all = np.zeros((num_kv, d, d)), np.zeros((num_kv, d, d))
    for g in range(num_groups):
        cols = slice(g * r * d, (g + 1) * r * d)
        wk, wv = w.k[:, cols].astype(np.float64), w.v[:, cols].astype(np.float64)  # [E, r*D]
        uk, uv = _pca_basis(xx @ wk, d), _pca_basis(xx @ wv, d)                    # [r*D, D]
        new_k.append(wk @ uk)
        new_v.append(wv @ uv)
        uk_all[g * r:(g + 1) * r] = uk.reshape(r, d, d)
        uv_all[g * r:(g + 1) * r] = uv.reshape(r, d, d)
    dt = w.k.dtype
    out = fold_head_transforms(w, num_heads, head_dim, uk_all.astype(dt), uv_all.astype(dt))
    return (AttentionWeights(out.q, np.concatenate(new_k, 1).astype(dt), np.concatenate(new_v, 1).astype(dt),
                             out.o), uk_all, uv_all)


def mean_merge(kernel: np.ndarray, num_kv: int, num_groups: int, head_dim: int) -> np.ndarray:
    """[E, G0*D] -> [E, G*D], averaging the G0/G consecutive heads of each group."""
    e = kernel.shape[0]
    return np.ascontiguousarray(
        kernel.reshape(e, num_groups, num_kv // num_groups, head_dim).mean(axis=2).reshape(e, -1))


def first_merge(kernel: np.ndarray, num_kv: int, num_groups: int, head_dim: int) -> np.ndarray:
    e = kernel.shape[0]
    return np.ascontiguousarray(kernel.reshape(e, num_groups, num_kv // num_groups, head_dim)[:, :, 0].reshape(e, -1))


def random_kernel(seed: int, module_index: int, which: int, embed: int, width: int, dtype) -> np.ndarray:
    """Fresh T5X key/value init (variance_scaling(1, fan_in, normal)), deterministic in (seed, module, which)."""
    import jax
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), module_index), which)
    return np.asarray(init(key, (embed, width), np.float32), dtype)


def kv_reconstruction_error(src: AttentionWeights, new: AttentionWeights, tk: np.ndarray, tv: np.ndarray,
                            num_kv: int, num_groups: int, head_dim: int, x: np.ndarray | None) -> dict[str, float]:
    """Relative calibration error of the keys / values as the source heads' queries see them.

    Source head j's keys X W_k,j [N, D] are represented in the converted model by X W'_k,g(j) tk_j^T (tk_j is
    the matrix folded into head j's query kernels; identity for mean/first/random); likewise for values with tv.
    Returns {'k_rel_error', 'v_rel_error'}: ||reconstruction - source||_F / ||source||_F over all heads.
    """
    xx = np.eye(src.k.shape[0]) if x is None else x.astype(np.float64)
    d, r = head_dim, num_kv // num_groups
    out = {}
    for name, a, b, t in (("k", src.k, new.k, tk), ("v", src.v, new.v, tv)):
        err = tot = 0.0
        for j in range(num_kv):
            g = j // r
            ref = xx @ a[:, j * d:(j + 1) * d].astype(np.float64)
            rec = (xx @ b[:, g * d:(g + 1) * d].astype(np.float64)) @ t[j].T
            err += float(np.sum((ref - rec) ** 2))
            tot += float(np.sum(ref ** 2))
        out[f"{name}_rel_error"] = (err / tot) ** 0.5 if tot else 0.0
    return out


def convert_attention(w: AttentionWeights, num_heads: int, num_kv: int, num_groups: int, head_dim: int,
                      method: str, x: np.ndarray | None = None, seed: int = 0,
                      module_index: int = 0) -> AttentionWeights:
    """One attention module from num_kv to num_groups key/value heads (K/V of width num_groups*head_dim)."""
    return convert_attention_with_transforms(w, num_heads, num_kv, num_groups, head_dim, method, x, seed,
                                             module_index)[0]


def convert_attention_with_transforms(w: AttentionWeights, num_heads: int, num_kv: int, num_groups: int,
                                      head_dim: int, method: str, x: np.ndarray | None = None, seed: int = 0,
                                      module_index: int = 0) -> tuple[AttentionWeights, np.ndarray, np.ndarray]:
    """As `convert_attention`, also returning the per-source-head transforms tk, tv [G0, D, D] folded into the
    query / out kernels (see `kv_reconstruction_error`)."""
    if method not in METHODS:
        raise ValueError(f"unknown conversion method {method!r}; choose one of {METHODS}")
    if num_kv % num_groups:
        raise ValueError(f"{num_groups} key/value heads do not divide the current {num_kv}")
    d = head_dim
    eye = np.broadcast_to(np.eye(d), (num_kv, d, d))
    if method == "mean":
        return AttentionWeights(w.q, mean_merge(w.k, num_kv, num_groups, d), mean_merge(w.v, num_kv, num_groups, d),
                                w.o), eye, eye
    if method == "first":
        return AttentionWeights(w.q, first_merge(w.k, num_kv, num_groups, d),
                                first_merge(w.v, num_kv, num_groups, d), w.o), eye, eye
    if method == "random":
        e = w.k.shape[0]
        return AttentionWeights(w.q, random_kernel(seed, module_index, 0, e, num_groups * d, w.k.dtype),
                                random_kernel(seed, module_index, 1, e, num_groups * d, w.v.dtype), w.o), eye, eye
    if method == "align":
        rk, rv = align_rotations(w, num_kv, num_groups, d, x)
        rotated = rotate_heads(w, num_heads, num_kv, d, rk, rv)
        return convert_attention(rotated, num_heads, num_kv, num_groups, d, "mean"), rk, rv
    return svd_merge(w, num_heads, num_kv, num_groups, d, x)


# ------------------------------------------------------------------------------------------- whole model


@dataclasses.dataclass
class ConversionResult:
    params: dict[str, Any]  # flat 'a/b/kernel' -> array
    config: ModelConfig
    grouping: dict[str, Any]  # per module: source/target kv heads, query->kv group map, errors


def _module_info(kind: str, h: int, g0: int, g: int, calibrated: bool) -> dict[str, Any]:
    return {"kind": kind, "source_kv_heads": g0, "kv_heads": g,
            "query_to_kv_head": [i // (h // g) for i in range(h)],
            "source_kv_heads_per_group": [list(range(j * (g0 // g), (j + 1) * (g0 // g))) for j in range(g)],
            "calibrated": calibrated}


def iter_converted(params: Mapping[str, Any], config: ModelConfig, num_kv_heads: int, layers: str = "decoder",
                   method: str = "mean", seed: int = 0, calibration: Mapping[str, np.ndarray] | None = None,
                   grouping: dict[str, Any] | None = None, measure_error: bool = False,
                   transforms: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
                   ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (flat name, converted array) for every parameter, in the source's order, one module at a time.

    `params` may be a lazy mapping (e.g. `checkpoint.TensorSource`): each tensor is looked up once, so at most one
    attention module's four kernels are alive here, which is what lets `convert` stream a checkpoint to disk.
    Per-module grouping records (and K/V reconstruction errors with `measure_error`) go into `grouping`, and the
    per-source-head transforms (tk, tv) [G0, D, D] into `transforms` (what `convert_moments` needs).
    """
    if method not in METHODS:
        raise ValueError(f"unknown conversion method {method!r}; choose one of {METHODS}")
    validate_target(config, num_kv_heads, layers)
    from gqa_uptrain.trees import flat_params
    flat = flat_params(params)
    h, d = config.num_heads, config.head_dim
    jobs = [(kind, p) for kind in kinds_for(layers) for p in module_paths(config, kind)]
    module_of = {f"{p}/{n}/kernel": (index, kind, p) for index, (kind, p) in enumerate(jobs)
                 for n in ("query", "key", "value", "out")}
    done: set[str] = set()
    for name in list(flat):
        if name not in module_of:
            yield name, flat[name]
            continue
        index, kind, prefix = module_of[name]
        if prefix in done:
            continue
        done.add(prefix)
        g0 = current_kv_heads(config, kind)
        w = AttentionWeights(*(flat[f"{prefix}/{n}/kernel"] for n in ("query", "key", "value", "out")))
        x = calibration.get(prefix) if calibration else None
        new, tk, tv = convert_attention_with_transforms(w, h, g0, num_kv_heads, d, method, x, seed, index)
        if grouping is not None:
            info = _module_info(kind, h, g0, num_kv_heads, x is not None and method in DATA_METHODS)
            if measure_error:
                info.update(kv_reconstruction_error(w, new, tk, tv, g0, num_kv_heads, d, x))
            grouping[prefix] = info
        if transforms is not None:
            transforms[prefix] = (np.asarray(tk), np.asarray(tv))
        del w
        for n, arr in zip(("query", "key", "value", "out"), (new.q, new.k, new.v, new.o)):
            yield f"{prefix}/{n}/kernel", arr


def convert_params(params: Mapping[str, Any], config: ModelConfig, num_kv_heads: int, layers: str = "decoder",
                   method: str = "mean", seed: int = 0, calibration: Mapping[str, np.ndarray] | None = None,
                   progress: Callable[[Iterator], Iterator] | None = None,
                   measure_error: bool = False) -> ConversionResult:
    """Convert params (nested or flat) of `config` to `num_kv_heads` KV heads in the chosen stacks, in memory.

    calibration: module prefix ('decoder/layers_0/self_attention') -> K/V-projection inputs [N, E]; used by the
    `align` and `svd` methods (missing entries fall back to the data-free variants).
    Returns flat params; untouched tensors are the same objects as the input's (no copy).
    """
    grouping: dict[str, Any] = {}
    items = iter_converted(params, config, num_kv_heads, layers, method, seed, calibration, grouping, measure_error)
    out = dict(progress(items) if progress is not None else items)
    return ConversionResult(out, target_config(config, num_kv_heads, layers), grouping)


# ------------------------------------------------------------------------------------------- optimizer state


def _is_identity(t: np.ndarray) -> bool:
    return bool(np.array_equal(t, np.broadcast_to(np.eye(t.shape[-1]), t.shape)))


def merge_head_moments(v: np.ndarray, t: np.ndarray, num_groups: int, rule: str = "sum") -> np.ndarray:
    """Second moments of K or V [E, G0*D] -> [E, G*D]: v'_g = sum_j v_j (t_j o t_j) over the group's heads j,
    divided by r = G0/G for rule "mean" (module docstring). t: [G0, D, D] per-source-head transforms."""
    if rule not in MOMENT_RULES:
        raise ValueError(f"unknown moment rule {rule!r}; choose one of {MOMENT_RULES}")
    g0, d = t.shape[0], t.shape[-1]
    heads = np.einsum("jed,jdf->jef", _heads(v.astype(np.float64), g0, d), np.square(t.astype(np.float64)))
    merged = heads.reshape(num_groups, g0 // num_groups, v.shape[0], d).sum(axis=1)
    if rule == "mean":
        merged /= g0 // num_groups
    return _join(merged).astype(np.float32)


def _query_moments(v: np.ndarray, t: np.ndarray, num_heads: int) -> np.ndarray:
    """Query kernel second moments [E, H*D] under W_q,h -> W_q,h t_owner(h): v_q,h (t o t)."""
    d = t.shape[-1]
    owner = np.arange(num_heads) // (num_heads // t.shape[0])
    q = np.einsum("hed,hdf->hef", _heads(v.astype(np.float64), num_heads, d), np.square(t[owner].astype(np.float64)))
    return _join(q).astype(np.float32)


def _out_moments(v: np.ndarray, t: np.ndarray, num_heads: int) -> np.ndarray:
    """Out kernel second moments [H*D, E] under rows W_o,h -> t_owner(h)^T W_o,h: (t o t)^T v_o,h."""
    d = t.shape[-1]
    owner = np.arange(num_heads) // (num_heads // t.shape[0])
    o = np.einsum("hdf,hde->hfe", np.square(t[owner].astype(np.float64)), _out_heads(v.astype(np.float64),
                                                                                    num_heads, d))
    return np.ascontiguousarray(o.reshape(num_heads * d, -1)).astype(np.float32)


def convert_moments(moments: Mapping[str, Mapping[str, np.ndarray]], config: ModelConfig, num_kv_heads: int,
                    layers: str = "decoder", transforms: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                    rule: str = "sum", min_dim_size_to_factor: int = 128) -> dict[str, dict[str, np.ndarray]]:
    """Adafactor statistics of `config`'s parameters -> those of the converted model (see module docstring).

    moments: flat parameter name -> {"v_row", "v_col"} or {"v"} (optim.second_moment's convention).
    transforms: module prefix -> (tk, tv) [G0, D, D] as `iter_converted` records them; missing modules (and the
    methods mean/first/random) use identities. Unconverted parameters, and modules whose heads are neither merged
    nor transformed (G = G0 with identity transforms), keep their statistics unchanged; converted kernels are
    re-factored with `min_dim_size_to_factor` for their new shapes.
    """
    from gqa_uptrain.optim import factor_second_moment, second_moment
    if rule not in MOMENT_RULES:
        raise ValueError(f"unknown moment rule {rule!r}; choose one of {MOMENT_RULES}")
    validate_target(config, num_kv_heads, layers)
    h, d, e = config.num_heads, config.head_dim, config.d_model
    out = {name: dict(stats) for name, stats in moments.items()}
    for kind in kinds_for(layers):
        g0 = current_kv_heads(config, kind)
        eye = np.broadcast_to(np.eye(d), (g0, d, d))
        for prefix in module_paths(config, kind):
            tk, tv = (transforms or {}).get(prefix, (eye, eye))
            if g0 == num_kv_heads and _is_identity(tk) and _is_identity(tv):
                continue
            names = {n: f"{prefix}/{n}/kernel" for n in ("query", "key", "value", "out")}
            missing = [x for x in names.values() if x not in moments]
            if missing:
                raise ValueError(f"optimizer state has no statistics for {missing[0]!r}")
            shapes = {"query": (e, h * d), "key": (e, g0 * d), "value": (e, g0 * d), "out": (h * d, e)}

            def full(n):
                return second_moment(moments[names[n]], shapes[n], names[n])

            new = {"key": merge_head_moments(full("key"), tk, num_kv_heads, rule),
                   "value": merge_head_moments(full("value"), tv, num_kv_heads, rule)}
            # Query / out kernels change only with a non-identity transform; otherwise their statistics stay as
            # they were stored.
            if not _is_identity(tk):
                new["query"] = _query_moments(full("query"), tk, h)
            if not _is_identity(tv):
                new["out"] = _out_moments(full("out"), tv, h)
            for n, v in new.items():
                out[names[n]] = factor_second_moment(v, min_dim_size_to_factor)
    return out


# ------------------------------------------------------------------------------------------- calibration


def collect_calibration(params: Any, config: ModelConfig, encoder_tokens: np.ndarray, decoder_input_tokens: np.ndarray,
                        decoder_target_tokens: np.ndarray | None = None, layers: str = "decoder",
                        max_rows: int = 4096, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of every converted module's key projection (= value projection input) on a calibration batch.

    encoder_tokens [b, src], decoder_input_tokens [b, tgt] (0 = padding). Returns prefix -> [N, E] float32 with
    padding positions dropped and at most `max_rows` rows (random subset, seeded).
    """
    import flax.linen as nn
    import jax.numpy as jnp

    from gqa_uptrain.model import Transformer
    from gqa_uptrain.trees import nested_params
    wanted = {p for kind in kinds_for(layers) for p in module_paths(config, kind)}
    captured: dict[str, np.ndarray] = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and mod.name == "key":
            prefix = "/".join(mod.path[:-1])
            if prefix in wanted and prefix not in captured:
                captured[prefix] = np.asarray(args[0])
        return next_fun(*args, **kwargs)

    nested = nested_params(params)
    with nn.intercept_methods(interceptor):
        Transformer(config).apply({"params": nested}, jnp.asarray(encoder_tokens), jnp.asarray(decoder_input_tokens),
                                  None if decoder_target_tokens is None else jnp.asarray(decoder_target_tokens))
    enc_valid = np.asarray(encoder_tokens) > 0
    dec_valid = (np.asarray(decoder_target_tokens) > 0 if decoder_target_tokens is not None
                 else np.ones(np.shape(decoder_input_tokens), bool))
    rng = np.random.RandomState(seed)
    out = {}
    for prefix, act in captured.items():
        valid = dec_valid if prefix.endswith("/self_attention") and prefix.startswith("decoder") else enc_valid
        rows = act[valid].astype(np.float32)
        if len(rows) > max_rows:
            rows = rows[np.sort(rng.choice(len(rows), max_rows, replace=False))]
        out[prefix] = rows
    missing = wanted - set(out)
    if missing:
        raise RuntimeError(f"calibration did not capture {sorted(missing)[:2]}")
    return out
