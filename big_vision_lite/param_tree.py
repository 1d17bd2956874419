"""Parameter trees: flat "a/b/c" names, scanned vs per-layer layouts, posemb resizing.

Pure helpers shared by checkpoints.py (files), model_init.py (fine-tuning init) and
run_state.py (training workdirs). The scanned layout stacks a tower's layers on a leading
axis L (`img/Transformer/encoderblock/...`, `llm/layers/...`); the per-layer one names them
`img/Transformer/encoderblock_{i}/...` / `llm/layers/{i}/...`.
"""
from collections.abc import Iterable, Mapping
import math
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
import scipy.ndimage

from big_vision_lite import checkpoints_config as cc
from big_vision_lite.checkpoints_config import IMG_BLOCK, LLM_LAYERS  # pylint: disable=g-importing-member

Params = dict[str, Any]
_PER_LAYER_RE = re.compile(r"^(?:(img/Transformer/encoderblock)_(\d+)|(llm/layers)/(\d+))/(.+)$")


def flatten(params: Mapping[str, Any]) -> dict[str, Any]:
  """Nested dict -> {"a/b/c": array} (empty sub-dicts vanish)."""
  out = {}

  def visit(prefix, node):
    for key, value in node.items():
      if not isinstance(key, str) or not key or "/" in key:
        raise ValueError(f"params: key {key!r} under {prefix or '<root>'!r} must be a non-empty "
                         "str without '/'")
      name = f"{prefix}/{key}" if prefix else key
      if isinstance(value, Mapping):
        visit(name, value)
      else:
        out[name] = value

  visit("", params)
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{"a/b/c": array} -> nested dict (inverse of `flatten`)."""
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for i, part in enumerate(parents):
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f"params: {name!r} lies under {'/'.join(parents[:i + 1])!r}, which is a leaf")
    if leaf in node:
      raise ValueError(f"params: {name!r} given twice (or is also a parent of other keys)")
    node[leaf] = value
  return tree


def split_layer(name: str) -> tuple[str, int] | None:
  """"img/Transformer/encoderblock_3/x" -> ("img/Transformer/encoderblock/x", 3); None if stacked."""
  m = _PER_LAYER_RE.match(name)
  if not m:
    return None
  prefix, layer = (m[1], m[2]) if m[1] else (m[3], m[4])
  return f"{prefix}/{m[5]}", int(layer)


def layer_name(stacked: str, i: int) -> str:
  """Inverse of `split_layer`."""
  if stacked.startswith(IMG_BLOCK + "/"):
    return f"{IMG_BLOCK}_{i}/{stacked[len(IMG_BLOCK) + 1:]}"
  return f"{LLM_LAYERS}/{i}/{stacked[len(LLM_LAYERS) + 1:]}"


def is_stacked(name: str) -> bool:
  """Whether `name` is a scanned (stacked on axis 0) layer parameter."""
  if name.startswith(IMG_BLOCK + "/"):
    return True
  return name.startswith(LLM_LAYERS + "/") and not name.split("/")[2].isdigit()


def group_layers(names: Iterable[str], where: str) -> dict[str, list[tuple[int | None, str]]]:
  """Groups per-layer names under their stacked name: {stacked: [(layer or None, name)]}."""
  groups: dict[str, list[tuple[int | None, str]]] = {}
  for name in names:
    split = split_layer(name)
    stacked, layer = split if split else (name, None)
    groups.setdefault(stacked, []).append((layer, name))
  depth: dict[str, int] = {}
  for stacked, parts in groups.items():
    layers = sorted(i for i, _ in parts if i is not None)
    if len(layers) != len(parts) and layers:
      raise ValueError(f"{where}: {stacked} is stored both stacked and per layer")
    if layers and layers != list(range(len(layers))):
      raise ValueError(f"{where}: {stacked} is stored for layers {layers}; expected every layer "
                       f"0..{max(layers)}")
    if layers and depth.setdefault(cc.tower(stacked), len(layers)) != len(layers):
      raise ValueError(f"{where}: {stacked} has {len(layers)} layers, other "
                       f"{cc.tower(stacked)} parameters have {depth[cc.tower(stacked)]}")
    parts.sort(key=lambda p: -1 if p[0] is None else p[0])
  return groups


def stack_layers(params: Mapping[str, Any]) -> Params:
  """Per-layer layout (`encoderblock_{i}`, `llm/layers/{i}`) -> scanned (stacked on axis 0).

  Already stacked entries are kept. numpy leaves stack with numpy, others with jax.numpy.
  """
  flat = flatten(params)
  groups = group_layers(flat, "stack_layers")
  out = {}
  for stacked, parts in groups.items():
    if parts[0][0] is None:
      out[stacked] = flat[parts[0][1]]
    else:
      arrays = [flat[name] for _, name in parts]
      xp = np if all(isinstance(a, np.ndarray) for a in arrays) else jnp
      out[stacked] = xp.stack(arrays)
  return unflatten(out)


def unstack_layers(params: Mapping[str, Any], towers: Iterable[str] = ("img", "llm")) -> Params:
  """Scanned layout -> per-layer layout for the given towers (views, no copies for numpy)."""
  towers = tuple(towers)
  out = {}
  for name, value in flatten(params).items():
    if cc.tower(name) in towers and is_stacked(name):
      for i in range(value.shape[0]):
        out[layer_name(name, i)] = value[i]
    else:
      out[name] = value
  return unflatten(out)


def resample_posemb(posemb: np.ndarray, new_n: int) -> np.ndarray:
  """Resizes learned position embeddings [1,N,W] -> [1,new_n,W] (same dtype).

  As big_vision's `vit.resample_posemb`: the sqrt(N) x sqrt(N) grid is resized with
  `scipy.ndimage.zoom(order=1)` (bilinear spline interpolation, corners kept), computed in
  float32 (float64 input: float64).
  """
  posemb = np.asarray(posemb)
  _, n, width = posemb.shape
  old_side, new_side = math.isqrt(n), math.isqrt(new_n)
  if old_side ** 2 != n or new_side ** 2 != new_n or posemb.shape[0] != 1:
    raise ValueError(f"resample_posemb: need [1,N,W] with square N and a square new_n; got "
                     f"{posemb.shape} -> {new_n}")
  if new_n == n:
    return posemb
  work = np.float64 if posemb.dtype == np.float64 else np.float32
  grid = posemb.reshape(old_side, old_side, width).astype(work)
  zoom = new_side / old_side
  grid = scipy.ndimage.zoom(grid, (zoom, zoom, 1), order=1)
  return grid.reshape(1, new_n, width).astype(posemb.dtype)
