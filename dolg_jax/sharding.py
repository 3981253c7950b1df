"""Device mesh and shardings for training.

`make_mesh(config.mesh)` builds one `Mesh` with the axes `data` and `model` (`data=-1`: all the
devices left after `model`; ValueError when the sizes do not match the devices). The batch is split
over both axes (`BATCH_AXES`: `batch_sharding`, `global_batch`). Of the parameters only the margin
head's class dimension is split, over `model` (`param_shardings`, `head_weight_spec`); everything
else is replicated. Design notes: docs/design_notes.md.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import ml_collections

DATA = 'data'
MODEL = 'model'
BATCH_AXES = (DATA, MODEL)  # the mesh axes the batch is split over


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  """Builds the (`data`, `model`) mesh described by `mesh_cfg` (fields `data`, `model`)."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  model = int(mesh_cfg.model)
  data = int(mesh_cfg.data)
  if model < 1 or n % model:
    raise ValueError(f'config.mesh.model={model} must be >= 1 and divide the {n} devices.')
  if data == -1:
    data = n // model
  if data * model != n:
    raise ValueError(f'config.mesh: data={mesh_cfg.data} x model={model} != {n} devices.')
  return jax.make_mesh(
    (data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_spec() -> P:
  """Leading (batch) dimension split over every mesh axis (`BATCH_AXES`)."""
  return P(BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every mesh axis, the rest replicated."""
  return NamedSharding(mesh, batch_spec())


def batch_devices(mesh: Mesh) -> int:
  """How many ways the batch is split: the product of the `BATCH_AXES` sizes (all devices)."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def head_weight_spec() -> P:
  """Margin-head weight (num_classes, dim): classes split over `model`."""
  return P(MODEL, None)


def param_shardings(mesh: Mesh, params: Any) -> Any:
  """Shardings for a {'model': ..., 'head': {'weight': ...}} parameter tree.

  The head weight is split over `model` (ValueError unless its class count divides by the
  `model` axis size); every other parameter is replicated.
  """

  def spec(path, leaf):
    keys = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
    if keys[:2] == ['head', 'weight']:
      if leaf.shape[0] % mesh.shape[MODEL]:
        raise ValueError(
          f'head.num_classes={leaf.shape[0]} is not divisible by config.mesh.model='
          f'{mesh.shape[MODEL]}; pick a model axis size that divides it.'
        )
      return NamedSharding(mesh, head_weight_spec())
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(spec, params)


def place(host_tree: Any, shardings: Any) -> Any:
  """Puts host values (identical on every process) into global arrays with `shardings`."""
  return jax.tree.map(
    lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx, x=np.asarray(x): x[idx]),
    host_tree,
    shardings,
  )


def host_replicated(tree: Any) -> Any:
  """Host (numpy) copy of replicated arrays: this process's local replica, no communication."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles each process's local batch into one global array per key, its batch dimension
  split over every mesh axis (`batch_sharding`)."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in local_batch.items()
  }
