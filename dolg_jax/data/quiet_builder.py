"""`LoggedStatus`: a TFDS builder mixin that logs the two status lines TFDS prints.

`tfds.core.DatasetBuilder.download_and_prepare` prints "Downloading and preparing dataset ..."
and "Dataset ... downloaded and prepared ..." to stdout whatever the verbosity; for our builders
(sizes unknown: "Unknown size" three times) they say nothing our own lines do not. Put first in
the bases (`class Gldv2(LoggedStatus, tfds.core.GeneratorBasedBuilder)`), it sends them to absl
INFO instead: hidden by default, shown with `--verbosity=1`. No TFDS option does this.
"""

from absl import logging


class LoggedStatus:
  """Overrides TFDS' two status printers (private methods of `tfds.core.DatasetBuilder`)."""

  def _log_download_bytes(self) -> None:
    logging.info('Preparing dataset %s in %s.', self.name, self.data_dir)

  def _log_download_done(self) -> None:
    logging.info('Dataset %s prepared in %s.', self.name, self.data_dir)
