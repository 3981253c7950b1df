"""`PackagedBuilder`: what every TFDS builder of this package changes in TFDS' defaults.

Put first in the bases (`class Gldv2(PackagedBuilder, tfds.core.GeneratorBasedBuilder)`):
- `code_path` is the builder's own module file (TFDS' default probes `importlib_resources`, not
  installed, for builders inside packages);
- the two status lines `download_and_prepare` prints to stdout whatever the verbosity
  ("Downloading and preparing dataset Unknown size ...", "... Subsequent calls will reuse this
  data.") go to absl INFO: hidden by default, shown with `--verbosity=1`. No TFDS option does it.
These override private members of `tfds.core.DatasetBuilder` (TFDS is pinned in requirements.txt).
"""

import inspect

from absl import logging
from etils import epath
import tensorflow_datasets as tfds


class PackagedBuilder:
  """Mixin for `tfds.core.GeneratorBasedBuilder` subclasses (see the module docstring)."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))

  def _log_download_bytes(self) -> None:
    logging.info('Preparing dataset %s in %s.', self.name, self.data_dir)

  def _log_download_done(self) -> None:
    logging.info('Dataset %s prepared in %s.', self.name, self.data_dir)
