"""Serve an index of your own images over HTTP: python -m dolg_jax.serve.

  python -m dolg_jax.serve --index=INDEX_DIR [--host=127.0.0.1] [--port=8080] [--token=SECRET]
      [--checkpoint=PATH | --workdir=DIR] [--backend=faiss|milvus --milvus_uri=URI
      --milvus_collection=NAME] [--max_upload_mb=20] [--cors_origin=ORIGIN]

Loads the model and the index once (compiling the common shapes), prints one line
`serving INDEX_DIR (N images) on http://HOST:PORT` when it answers (`GET /healthz` is 200), and
stops cleanly on SIGINT/SIGTERM (requests in flight are answered). Routes: `POST /api/search`
(multipart `image` files with `box`, `k`, `rerank`; or JSON {"descriptors": [[...]], "k": K}) ->
the results.json shape of `dolg_jax.search` with an "id" per result; `GET /api/image/{id}`
(`?thumb=1`); `POST /api/reload`; `GET /healthz`, `/metrics`, `/openapi.json`; `GET /` the web
page. Refused requests get a 4xx JSON {"error": ...}. With --port=0 a free port is chosen (the
ready line names it). A failure to start ends with one line `FAILED: ...` (exit code 1).
"""

import os
import signal
import socket
import sys

from absl import app
from absl import flags
import uvicorn

from dolg_jax import cli
from dolg_jax.collection import files
from dolg_jax.collection import query
from dolg_jax.collection import store as store_lib
from dolg_jax.serve import app as app_lib
from dolg_jax.serve import backends
from dolg_jax.serve import service as service_lib
from dolg_jax.training import failures

FLAGS = flags.FLAGS
_D = service_lib.Settings()


def define_flags() -> None:
  """Defines the command-line flags (at entry only, so importing this module defines none)."""
  flags.DEFINE_string('index', None, 'Index directory (python -m dolg_jax.index --out).')
  flags.DEFINE_string('host', _D.host, 'Address to bind (127.0.0.1: this machine only).')
  flags.DEFINE_integer('port', _D.port, 'Port (0 = any free port, named in the ready line).')
  flags.DEFINE_string(
    'token', _D.token, 'If set, every /api call needs Authorization: Bearer TOKEN (else 401).'
  )
  flags.DEFINE_string('cors_origin', _D.cors_origin, 'Origin allowed by CORS (default: none).')
  cli.define_model_flags(
    config=False,
    checkpoint_help='The checkpoint the index was built with, if it moved.',
    workdir_help='The same for a training workdir.',
  )
  flags.DEFINE_enum(
    'backend',
    _D.backend,
    list(backends.BACKENDS),
    'Nearest neighbours from the '
    "index's FAISS structure or from a Milvus collection (python -m "
    'dolg_jax.publish).',
  )
  flags.DEFINE_string('milvus_uri', _D.milvus_uri, 'milvus-lite file or http://host:19530.')
  flags.DEFINE_string('milvus_collection', _D.milvus_collection, 'Milvus collection name.')
  flags.DEFINE_integer('max_upload_mb', _D.max_upload_mb, 'Largest request body (413 above).')
  flags.DEFINE_integer('max_k', _D.max_k, 'Largest k a request may ask for.')
  flags.DEFINE_integer('max_queries', _D.max_queries, 'Images or descriptors per request.')
  flags.DEFINE_float(
    'max_wait_ms',
    _D.max_wait_ms,
    'Micro-batching: how long the first '
    'waiting request waits for others (0 = one request per device call).',
  )
  flags.DEFINE_integer(
    'max_batch_images',
    _D.max_batch_images,
    'Micro-batching: images per device call (1 = one at a time).',
  )
  flags.DEFINE_float(
    'watch_s',
    _D.watch_s,
    'Seconds between manifest checks for a grown index (0 = reload only on POST /api/reload).',
  )
  flags.DEFINE_integer(
    'warmup_shapes',
    _D.warmup_shapes,
    'Most common indexed image sizes compiled before the ready line.',
  )


def settings_from_flags() -> service_lib.Settings:
  return service_lib.Settings(
    host=FLAGS.host,
    port=FLAGS.port,
    token=FLAGS.token,
    cors_origin=FLAGS.cors_origin,
    max_upload_mb=FLAGS.max_upload_mb,
    max_k=FLAGS.max_k,
    max_queries=FLAGS.max_queries,
    max_wait_ms=FLAGS.max_wait_ms,
    max_batch_images=FLAGS.max_batch_images,
    watch_s=FLAGS.watch_s,
    warmup_shapes=FLAGS.warmup_shapes,
    backend=FLAGS.backend,
    milvus_uri=FLAGS.milvus_uri,
    milvus_collection=FLAGS.milvus_collection,
  )


def bind(host: str, port: int) -> socket.socket:
  family = socket.AF_INET6 if ':' in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((host, port))
  sock.listen(1024)
  sock.set_inheritable(True)
  return sock


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS.index:
    raise app.UsageError('--index is required.')
  if FLAGS.max_upload_mb < 1 or FLAGS.max_k < 1 or FLAGS.max_queries < 1:
    raise app.UsageError('--max_upload_mb, --max_k and --max_queries must be >= 1')
  failures.quiet_library_tracebacks()
  settings = settings_from_flags()
  try:
    manifest = store_lib.IndexStore(FLAGS.index).manifest()
    cli.enable_compilation_cache(query.config_of(manifest).eval.get('xla_cache_dir', ''))
    svc = service_lib.Service(
      FLAGS.index, settings, checkpoint=FLAGS.checkpoint, workdir=FLAGS.workdir
    )
    sock = bind(settings.host, settings.port)
  except Exception as e:  # noqa: BLE001  # every fatal error ends in one line
    failures.exit_in_one_line(e, None)
  host, port = sock.getsockname()[:2]
  shown = f'[{host}]' if ':' in host else host
  server = uvicorn.Server(
    uvicorn.Config(
      app_lib.create_app(svc),
      log_level='warning',
      access_log=False,
      lifespan='off',
      timeout_graceful_shutdown=30,
      server_header=False,
    )
  )
  print(
    f'serving {files.escape(FLAGS.index)} ({len(svc)} images) on http://{shown}:{port}', flush=True
  )
  for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn re-raises the signal after its graceful
    signal.signal(sig, lambda *_: None)  # shutdown: then this ends the process, rc 0
  try:
    server.run(sockets=[sock])
  finally:
    svc.close()
  print('stopped', flush=True)
  sys.stdout.flush()
  os._exit(0)  # no waiting on library threads at exit


def run() -> None:
  define_flags()
  cli.run_app(main)


if __name__ == '__main__':
  run()
