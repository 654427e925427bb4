"""Static files served by WhiteNoise, asynchronously under ASGI.

WhiteNoise's Django middleware is synchronous and answers with a FileResponse over a file object, a
synchronous iterator: under ASGI Django then reads it chunk by chunk through thread hops and warns
("StreamingHttpResponse must consume synchronous iterators in order to serve them asynchronously").
This middleware keeps all of WhiteNoise (finding files, headers, caching, ranges, compressed variants) and
only hands the file to Django as an asynchronous iterator, each read done in a worker thread. Under WSGI
or the test client it behaves exactly like WhiteNoise's middleware.
"""

from __future__ import annotations

import asyncio

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from whitenoise.middleware import WhiteNoiseFileResponse, WhiteNoiseMiddleware

CHUNK_BYTES = 64 * 1024


async def _read(file):
    """The file's bytes in CHUNK_BYTES pieces, read in a thread; closes it at the end."""
    try:
        while chunk := await asyncio.to_thread(file.read, CHUNK_BYTES):
            yield chunk
    finally:
        file.close()


async def _nothing():
    return
    yield  # an empty asynchronous iterator (HEAD, 304)


class StaticFilesMiddleware(WhiteNoiseMiddleware):
    """WhiteNoise's middleware, async-capable: under ASGI static files stream without thread-bound iterators."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response=None, **kwargs):
        super().__init__(get_response, **kwargs)
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        return super().__call__(request)

    async def __acall__(self, request):
        static_file = self.find_file(request.path_info) if self.autorefresh else self.files.get(request.path_info)
        if static_file is None:
            return await self.get_response(request)
        answer = static_file.get_response(request.method, request.META)
        response = WhiteNoiseFileResponse(_read(answer.file) if answer.file else _nothing(), status=int(answer.status))
        del response["content-type"]
        for key, value in answer.headers:
            response[key] = value
        return response
