"""`first_line(error)`: the one-line form of an exception used in every user-facing error line.

The first line of the message (a KeyError's key without quotes; TensorStore's "See full details"
tail dropped), optionally behind the exception's type, cut to `limit` characters (None: whole).
"""


def first_line(error: BaseException, *, with_type: bool = True, limit: int | None = 400) -> str:
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  text = text.strip()
  text = text.splitlines()[0].split(' See full TensorStore details')[0] if text else ''
  if with_type:
    text = f'{type(error).__name__}: {text}' if text else type(error).__name__
  elif not text:
    text = type(error).__name__
  return text if limit is None else text[:limit]
