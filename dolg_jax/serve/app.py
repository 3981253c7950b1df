"""The HTTP layer of the search service: `create_app(service)`, a FastAPI app over a `Service`.

Routes (the public contract):
  POST /api/search   multipart: `image` files (one or more), `box` (TOP,LEFT,HEIGHT,WIDTH: one for
                     every image or one per image), `k` (default 100), `rerank` ('' or
                     'superglobal'); or JSON {"descriptors": [[...], ...], "k": K, "rerank": ...}.
                     -> {"index": INDEX_DIR, "queries": [{"query": FILENAME, "results":
                        [{"id": ROW, "path": PATH_AS_INDEXED, "score": COSINE}, ...]}, ...]}
  GET  /api/image/{id}[?thumb=1]   an indexed image by row id (no request names a path)
  POST /api/reload   picks up a grown index now (it is also picked up when the manifest changes)
  GET  /api/info     index size, dimension, limits (for the page)
  GET  /healthz, GET /metrics (Prometheus text), GET /openapi.json, GET / (the web page)
Errors are JSON {"error": "..."} naming the problem: 4xx for a refused request (413 a body over
--max_upload_mb, checked while it streams in, or an oversized upload; 401 no or a wrong bearer
token on /api with --token; 400 bad uploads, boxes, k, descriptors; 404 ids; 409 a refused
reload; 410 an indexed file no longer readable; 415 a body neither multipart nor JSON; 422
malformed parameters), 503 a damaged index, 500 an unexpected fault (the process stays up). No
CORS headers unless `cors_origin` is set.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, PlainTextResponse, Response

from dolg_jax.collection import query
from dolg_jax.collection import store as store_lib
from dolg_jax.serve import page
from dolg_jax.serve import service as service_lib

BadRequest = service_lib.BadRequest
ROUTES = (
  '/api/search',
  '/api/image',
  '/api/reload',
  '/api/info',
  '/healthz',
  '/metrics',
  '/openapi.json',
  '/',
)
SECURITY_HEADERS = [
  (b'x-content-type-options', b'nosniff'),
  (b'x-frame-options', b'DENY'),
  (b'referrer-policy', b'no-referrer'),
]


class AsciiJSON(JSONResponse):
  """JSON as results.json writes it (ASCII, so a path that is not UTF-8 is \\udcNN, as there)."""

  def render(self, content: Any) -> bytes:
    return json.dumps(content, ensure_ascii=True, allow_nan=False).encode('ascii')


def error(status: int, message: str, headers: Any = None) -> JSONResponse:
  return AsciiJSON({'error': message}, status_code=status, headers=headers)


class _TooLarge(BadRequest):
  """Raised while the body streams in (answered 413 by the BadRequest handler)."""

  def __init__(self, max_bytes: int):
    super().__init__(f'request body is over --max_upload_mb={max_bytes >> 20}', 413)


class Guard:
  """ASGI middleware: body size limit, bearer token on /api, metrics, security headers."""

  def __init__(self, app, settings: service_lib.Settings, metrics):
    self.app = app
    self.max_bytes = settings.max_upload_mb << 20
    self.token = settings.token
    self.metrics = metrics

  @staticmethod
  def route(path: str) -> str:
    if path.startswith('/api/image/'):
      return '/api/image'
    return path if path in ROUTES else 'other'

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    t0 = time.perf_counter()
    status = {'code': 500, 'started': False}
    route = self.route(scope['path'])

    async def send_wrapped(message):
      if message['type'] == 'http.response.start':
        status['code'], status['started'] = message['status'], True
        message = dict(message, headers=list(message.get('headers', [])) + SECURITY_HEADERS)
      await send(message)

    async def respond(resp: Response):
      await resp(scope, receive, send_wrapped)

    try:
      headers = dict(scope.get('headers') or [])
      if self.token and scope['path'].startswith('/api'):
        auth = headers.get(b'authorization', b'').decode('latin-1')
        if not hmac.compare_digest(auth.encode(), f'Bearer {self.token}'.encode()):
          return await respond(
            error(
              401,
              'this service needs Authorization: Bearer TOKEN on '
              '/api (--token); missing or wrong token',
              {'WWW-Authenticate': 'Bearer'},
            )
          )
      length = headers.get(b'content-length')
      if length is not None and length.isdigit() and int(length) > self.max_bytes:
        return await respond(
          error(
            413,
            f'request body of {int(length)} bytes is over --max_upload_mb={self.max_bytes >> 20}',
          )
        )
      seen = 0

      async def receive_limited():
        nonlocal seen
        message = await receive()
        if message['type'] == 'http.request':
          seen += len(message.get('body', b''))
          if seen > self.max_bytes:
            raise _TooLarge(self.max_bytes)
        return message

      try:
        await self.app(scope, receive_limited, send_wrapped)
      except _TooLarge:
        if not status['started']:
          await respond(error(413, f'request body is over --max_upload_mb={self.max_bytes >> 20}'))
    finally:
      self.metrics.request(route, status['code'], time.perf_counter() - t0)


def create_app(svc: service_lib.Service) -> FastAPI:
  settings = svc.settings
  api = FastAPI(
    title='dolg_jax search',
    version='1',
    docs_url=None,
    redoc_url=None,
    default_response_class=AsciiJSON,
  )

  @api.exception_handler(BadRequest)
  async def _bad(_, e: BadRequest):
    return error(e.status, str(e))

  @api.exception_handler(StarletteHTTPException)
  async def _http(_, e: StarletteHTTPException):
    return error(e.status_code, str(e.detail))

  @api.exception_handler(RequestValidationError)
  async def _validation(_, e: RequestValidationError):
    return error(422, '; '.join(f'{".".join(map(str, x["loc"]))}: {x["msg"]}' for x in e.errors()))

  @api.exception_handler(store_lib.DamagedIndexError)
  async def _damaged(_, e):
    return error(503, f'the index is damaged: {e}')

  @api.exception_handler(ValueError)
  async def _value(_, e: ValueError):
    return error(400, str(e))

  @api.exception_handler(Exception)
  async def _any(_, e: Exception):
    return error(500, f'internal error: {type(e).__name__}: {e}')

  @api.get('/healthz')
  async def healthz():
    return {'status': 'ok', 'images': len(svc)}

  @api.get('/metrics', response_class=PlainTextResponse)
  async def metrics():
    return PlainTextResponse(svc.metrics.text(), media_type='text/plain; version=0.0.4')

  @api.get('/', include_in_schema=False)
  async def index_page():
    return Response(
      page.html(),
      media_type='text/html; charset=utf-8',
      headers={'Content-Security-Policy': page.CSP},
    )

  @api.get('/api/info')
  async def info():
    col = svc.col
    return {
      'index': svc.index_dir,
      'images': len(col),
      'dim': col.rows.dim,
      'max_k': settings.max_k,
      'max_queries': settings.max_queries,
      'max_upload_mb': settings.max_upload_mb,
      'rerankers': list(query.RERANKERS),
      'backend': settings.backend,
      'generation': svc.generation,
      'last_reload_error': svc.last_reload_error,
    }

  @api.post('/api/reload')
  async def reload():
    try:
      return await run_in_threadpool(svc.reload)
    except Exception as e:  # noqa: BLE001  # the old index stays served
      return error(409, f'not reloaded (still serving {len(svc)} images): {type(e).__name__}: {e}')

  @api.get('/api/image/{row}')
  async def image(row: str, thumb: str = ''):
    if not row.isdigit() or len(row) > 18:
      raise BadRequest(f'image id must be a non-negative integer; got {row[:40]!r}', 404)
    data, kind = await run_in_threadpool(svc.image, int(row), thumb not in ('', '0', 'false'))
    return Response(data, media_type=kind, headers={'Cache-Control': 'private, max-age=60'})

  @api.post(
    '/api/search',
    openapi_extra={
      'requestBody': {
        'content': {
          'multipart/form-data': {
            'schema': {
              'type': 'object',
              'properties': {
                'image': {'type': 'array', 'items': {'type': 'string', 'format': 'binary'}},
                'box': {'type': 'string'},
                'k': {'type': 'integer'},
                'rerank': {'type': 'string'},
              },
            }
          },
          'application/json': {
            'schema': {
              'type': 'object',
              'properties': {
                'descriptors': {
                  'type': 'array',
                  'items': {'type': 'array', 'items': {'type': 'number'}},
                },
                'k': {'type': 'integer'},
                'rerank': {'type': 'string'},
              },
            }
          },
        }
      }
    },
  )
  async def search(request: Request):
    kind = request.headers.get('content-type', '').split(';')[0].strip().lower()
    if kind == 'application/json':
      return await _search_json(request)
    if kind != 'multipart/form-data':
      raise BadRequest(
        f'POST /api/search takes multipart/form-data (image files) or '
        f'application/json (descriptors); got {kind or "no content type"!r}',
        415,
      )
    arriving = [1]  # this request counts as on its way to the batcher until it is submitted
    svc.arriving(+1)
    try:
      return await _search_form(request, arriving)
    finally:
      svc.arriving(-arriving[0])

  async def _search_form(request: Request, arriving: list):
    form = await request.form(max_files=settings.max_queries, max_fields=64)
    try:
      uploads = form.getlist('image')
      files = [u for u in uploads if isinstance(u, UploadFile)]
      if len(files) != len(uploads):
        raise BadRequest('image must be a file upload (multipart with a filename)')
      if not files:
        raise BadRequest('no image: send one or more files in the multipart field "image"')
      k = svc.check_k(form.get('k') or 100)
      rerank = svc.check_rerank(form.get('rerank') or '')
      boxes = [str(b) for b in form.getlist('box') if str(b).strip()]
      if boxes and len(boxes) not in (1, len(files)):
        raise BadRequest(f'{len(boxes)} boxes for {len(files)} images: give one, or one per image')
      names = [f.filename or f'image{i}' for i, f in enumerate(files)]
      datas = [await f.read() for f in files]
    finally:
      await form.close()
    images = [await run_in_threadpool(svc.decode, n, d) for n, d in zip(names, datas)]
    bbxs = [None] * len(images)
    if boxes:
      boxes = boxes * len(images) if len(boxes) == 1 else boxes
      bbxs = [svc.parse_box(b, im, n) for b, im, n in zip(boxes, images, names)]
    svc.arriving(-1)  # before submitting: the batcher must not wait for this request itself
    arriving[0] = 0
    results = await asyncio.wrap_future(svc.search_images(images, bbxs, k, rerank))
    return {
      'index': svc.index_dir,
      'queries': [{'query': n, 'results': r} for n, r in zip(names, results)],
    }

  async def _search_json(request: Request):
    try:
      body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise BadRequest(f'the body is not valid JSON: {e}') from None
    if not isinstance(body, dict) or 'descriptors' not in body:
      raise BadRequest('JSON body must be an object {"descriptors": [[...], ...], "k": K}')
    k = svc.check_k(body.get('k', 100))
    rerank = svc.check_rerank(body.get('rerank') or '')
    results = await run_in_threadpool(svc.search_descriptors, body['descriptors'], k, rerank)
    return {
      'index': svc.index_dir,
      'queries': [{'query': f'descriptors[{i}]', 'results': r} for i, r in enumerate(results)],
    }

  app: Any = api
  if settings.cors_origin:
    app = CORSMiddleware(
      app,
      allow_origins=[settings.cors_origin],
      allow_methods=['GET', 'POST'],
      allow_headers=['Authorization', 'Content-Type'],
    )
  return Guard(app, settings, svc.metrics)
