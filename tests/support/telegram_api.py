"""A Telegram Bot API stand-in: a real HTTP server a real python-telegram-bot talks to.

Telegram's servers cannot be reached from tests, so :class:`TelegramAPIStandIn` plays them on
``127.0.0.1``. It runs an aiohttp server on its own event loop in a background thread, so the
bot may run in the test process (async tests) or as a subprocess (``python -m dbkeeper run`` with
``telegram.api_base_url = standin.base_url``)::

    with TelegramAPIStandIn() as api:
        app = Application.builder().token(api.token).base_url(api.base_url).build()
        ...
        api.push_command("/health", user_id=42)
        api.wait_for_message("healthy", chat_id=42)

Requests are parsed the way PTB's ``HTTPXRequest`` sends them (form-encoded parameters, or
multipart when a file is uploaded; every non-string value JSON-encoded) and answered with
Telegram's JSON envelope, so PTB raises the same exceptions it would against Telegram: 401/404
-> ``InvalidToken``, 409 -> ``Conflict``, 429 with ``retry_after`` -> ``RetryAfter``, 400 ->
``BadRequest``, 403 -> ``Forbidden``, anything else (500, 413, ...) -> ``NetworkError``.

Everything a test calls is thread-safe. Blocking waits (:meth:`TelegramAPIStandIn.wait_for`)
must not be used on the event loop that runs the bot; async tests use the ``*_async`` variants.
The token is never logged, never part of a :class:`Call` and never in ``repr()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from email.message import Message
from email.parser import Parser
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from aiohttp import web

__all__ = ["DEFAULT_TOKEN", "Call", "TelegramAPIError", "TelegramAPIStandIn"]

DEFAULT_TOKEN = "123456:TEST-TOKEN-abcdefghijklmnopqrstuvwxyz0123456789"
DEFAULT_BOT_USERNAME = "dbkeeper_test_bot"

_LOGGER = logging.getLogger(__name__)
_T = TypeVar("_T")

JSONDict = dict[str, Any]
Files = dict[str, tuple[str, bytes]]
MethodHandler = Callable[[JSONDict, Files], Any]

# Parameters that are free text: never JSON-decoded even when they look like a number.
_TEXT_PARAMS = frozenset(
    {
        "action",
        "callback_query_id",
        "caption",
        "custom_emoji_id",
        "data",
        "description",
        "document",
        "file_id",
        "inline_message_id",
        "ip_address",
        "language_code",
        "name",
        "parse_mode",
        "query",
        "secret_token",
        "short_description",
        "text",
        "title",
        "url",
    }
)
_CONFLICT_OTHER = (
    "Conflict: terminated by other getUpdates request; "
    "make sure that only one bot instance is running"
)
_CONFLICT_WEBHOOK = (
    "Conflict: can't use getUpdates method while webhook is active; "
    "use deleteWebhook to delete the webhook first"
)
_BODY_LIMIT = 64 * 1024 * 1024  # form and JSON bodies (multipart has its own limit)
_CHUNK = 64 * 1024
_MULTIPART_SLACK = 1024 * 1024  # room for the non-file fields of a multipart body


class TelegramAPIError(Exception):
    """Raised by a method handler to answer with a Telegram error envelope."""

    def __init__(self, status: int, description: str, parameters: JSONDict | None = None) -> None:
        super().__init__(description)
        self.status = status
        self.description = description
        self.parameters = parameters


@dataclass(frozen=True)
class Call:
    """One request the stand-in answered."""

    method: str
    """Bot API method, canonically spelled (``sendMessage``) when it is a known one."""
    params: JSONDict
    """Parameters from query string and body; PTB's JSON-encoded values are decoded."""
    files: Files
    """Uploaded files: form field name -> (filename, content; empty if cut off)."""
    time: float
    """``time.monotonic()`` when the request arrived."""
    status: int
    """HTTP status it was answered with."""
    response: JSONDict = field(repr=False)
    """The JSON body it was answered with."""
    http_method: str = "POST"
    upload_bytes: int = 0
    """Size of the uploaded files; of the whole body when that was too large to buffer."""
    authorized: bool = True
    """Whether the request carried the configured token."""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass
class _Rule:
    method: str | None
    remaining: int | None
    status: int
    description: str
    parameters: JSONDict | None = None

    def matches(self, method: str) -> bool:
        if self.method is None:
            return method != "getUpdates"
        return self.method.lower() == method.lower()


@dataclass
class _StoredFile:
    file_id: str
    file_unique_id: str
    file_name: str
    data: bytes
    file_path: str
    mime_type: str | None = None


class _Poll:
    """One waiting getUpdates request (lives on the server loop only)."""

    def __init__(self) -> None:
        self.wake = asyncio.Event()
        self.superseded = False


class TelegramAPIStandIn:
    """A fake Telegram Bot API server on ``127.0.0.1`` for end-to-end tests.

    Args:
        token: The only token accepted; any other gets 401 Unauthorized.
        bot_username: Username ``getMe`` reports (and ``push_command`` may address).
        bot_first_name: First name ``getMe`` reports.
        max_upload_bytes: Uploads above this many bytes are answered 413.
        port: Port to bind (0: a free one). A restarted stand-in binds its previous port again,
            so ``stop()`` then ``start()`` plays a Telegram outage to an already configured bot.
    """

    def __init__(
        self,
        token: str = DEFAULT_TOKEN,
        *,
        bot_username: str = DEFAULT_BOT_USERNAME,
        bot_first_name: str = "dbkeeper test",
        max_upload_bytes: int = 50_000_000,
        port: int = 0,
    ) -> None:
        self._token = token
        self.bot_username = bot_username
        self.bot_first_name = bot_first_name
        self.max_upload_bytes = max_upload_bytes
        bot_id, _, _ = token.partition(":")
        self.bot_id = int(bot_id) if bot_id.isdigit() else 123456

        self._cond = threading.Condition(threading.RLock())
        self._calls: list[Call] = []
        self._updates: list[JSONDict] = []
        self._next_update_id = 1
        self._message_ids = itertools.count(1)
        self._file_ids = itertools.count(1)
        self._files: dict[str, _StoredFile] = {}
        self._chats: dict[int, JSONDict] = {}
        self._commands: dict[tuple[str, str], list[JSONDict]] = {}
        self._rules: list[_Rule] = []
        self._delays: dict[str, float] = {}
        self._handlers: dict[str, MethodHandler] = {}
        self._webhook_url = ""
        self._conflicts = 0
        self._polls_waiting = 0

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = port or None
        # Server-loop-only state.
        self._poll: _Poll | None = None
        self._closing: asyncio.Event | None = None

        for name, handler in self._builtin_handlers().items():
            self._handlers[name.lower()] = handler
        self._canonical = {name.lower(): name for name in self._builtin_handlers()}

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        where = f"127.0.0.1:{self._port}" if self._port else "unbound"
        return f"<TelegramAPIStandIn {where} {state}>"

    # ------------------------------------------------------------------ lifecycle

    @property
    def token(self) -> str:
        """The accepted bot token (for building the Application; never log it)."""
        return self._token

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("TelegramAPIStandIn has not been started yet")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/bot`` for ``ApplicationBuilder.base_url``."""
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        """``http://127.0.0.1:PORT/file/bot`` for ``ApplicationBuilder.base_file_url``."""
        return f"http://127.0.0.1:{self.port}/file/bot"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> TelegramAPIStandIn:
        """Start the server thread; returns once it accepts connections."""
        if self.running:
            return self
        loop = asyncio.new_event_loop()
        ready: Future[None] = Future()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._startup())
            except BaseException as exc:
                ready.set_exception(exc)
                loop.close()
                return
            ready.set_result(None)
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="telegram-api-standin", daemon=True)
        self._thread.start()
        try:
            ready.result(timeout=10)
        except BaseException:
            self._thread.join(timeout=5)
            self._loop = self._thread = None
            raise
        return self

    def stop(self) -> None:
        """Answer pending long polls with ``[]``, close the server and join its thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
        self._loop = self._thread = None

    def __enter__(self) -> TelegramAPIStandIn:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def _startup(self) -> None:
        self._closing = asyncio.Event()
        app = web.Application(client_max_size=_BODY_LIMIT)
        app.router.add_route("*", "/bot{token}/{method}", self._handle_api)
        app.router.add_get("/file/bot{token}/{path:.+}", self._handle_file)
        app.router.add_route("*", "/{tail:.*}", self._handle_unknown)
        # No access log: request lines contain the token. Cancel handlers whose client went
        # away, so an abandoned long poll does not linger and later count as a conflict.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", self._port or 0).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def _shutdown(self) -> None:
        if self._closing is not None:
            self._closing.set()
        if self._poll is not None:
            self._poll.wake.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ injecting updates

    def push_update(self, update: JSONDict) -> int:
        """Queue a raw Update for getUpdates; assigns ``update_id`` if missing. Returns it."""
        with self._cond:
            update = dict(update)
            if "update_id" not in update:
                update["update_id"] = self._next_update_id
            update_id = int(update["update_id"])
            self._next_update_id = max(self._next_update_id, update_id + 1)
            self._updates.append(update)
            self._updates.sort(key=lambda u: int(u["update_id"]))
            self._cond.notify_all()
        self._call_on_loop(self._wake_poll)
        return update_id

    def push_command(
        self,
        text: str,
        *,
        user_id: int,
        chat_id: int | None = None,
        chat_type: str = "private",
        username: str | None = None,
        first_name: str = "Admin",
    ) -> int:
        """Queue a message starting with a command (``/cmd`` or ``/cmd@bot``), with its entity."""
        if not text.startswith("/") or len(text) < 2:
            raise ValueError(f"not a command: {text!r}")
        command = text.split(maxsplit=1)[0]
        entity = {"type": "bot_command", "offset": 0, "length": _utf16_len(command)}
        return self._push_message(text, [entity], user_id, chat_id, chat_type, username, first_name)

    def push_text(
        self,
        text: str,
        *,
        user_id: int,
        chat_id: int | None = None,
        chat_type: str = "private",
        username: str | None = None,
        first_name: str = "Admin",
    ) -> int:
        """Queue a plain text message (no entities)."""
        return self._push_message(text, [], user_id, chat_id, chat_type, username, first_name)

    def push_callback_query(
        self,
        data: str,
        *,
        user_id: int,
        chat_id: int | None = None,
        message_id: int | None = None,
        first_name: str = "Admin",
    ) -> int:
        """Queue a callback query from a button under a bot message in ``chat_id``."""
        chat_id = user_id if chat_id is None else chat_id
        user = _user(user_id, first_name, None)
        message = {
            "message_id": message_id if message_id is not None else next(self._message_ids),
            "date": int(time.time()),
            "chat": self._chat(chat_id),
            "from": self._bot_user(),
            "text": "…",
        }
        query = {
            "id": f"cbq{time.monotonic_ns()}",
            "from": user,
            "chat_instance": str(chat_id),
            "message": message,
            "data": data,
        }
        return self.push_update({"callback_query": query})

    def _push_message(
        self,
        text: str,
        entities: list[JSONDict],
        user_id: int,
        chat_id: int | None,
        chat_type: str,
        username: str | None,
        first_name: str,
    ) -> int:
        if chat_id is None:
            if chat_type != "private":
                raise ValueError(f"chat_id is required for a {chat_type} chat")
            chat_id = user_id
        if chat_type == "private":
            chat: JSONDict = {"id": chat_id, "type": "private", "first_name": first_name}
            if username:
                chat["username"] = username
        else:
            chat = {"id": chat_id, "type": chat_type, "title": f"Test {chat_type}"}
        with self._cond:
            self._chats[chat_id] = chat
        message: JSONDict = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": chat,
            "text": text,
        }
        if entities:
            message["entities"] = entities
        if chat_type == "channel":
            return self.push_update({"channel_post": message})
        message["from"] = _user(user_id, first_name, username)
        return self.push_update({"message": message})

    def pending_updates(self) -> list[JSONDict]:
        """Updates not yet confirmed by a getUpdates ``offset``."""
        with self._cond:
            return [dict(u) for u in self._updates]

    # ------------------------------------------------------------------ recorded traffic

    def calls(self, method: str | None = None) -> list[Call]:
        """Every answered request, in order; only ``method``'s if given."""
        with self._cond:
            if method is None:
                return list(self._calls)
            return [c for c in self._calls if c.method.lower() == method.lower()]

    def reset_calls(self) -> None:
        """Forget the recorded requests (not the state: updates, files, commands)."""
        with self._cond:
            self._calls.clear()

    def sent_messages(self, chat_id: int | str | None = None) -> list[JSONDict]:
        """Successful sendMessage parameters in order (``chat_id``, ``text``, ``parse_mode``,
        ``message_id`` always present), optionally only those to ``chat_id``."""
        out = []
        for c in self.calls("sendMessage"):
            if not c.ok or not _same_chat(c.params.get("chat_id"), chat_id):
                continue
            msg = {"text": None, "parse_mode": None, **c.params}
            msg["message_id"] = c.response["result"]["message_id"]
            out.append(msg)
        return out

    def sent_documents(self, chat_id: int | str | None = None) -> list[JSONDict]:
        """Successful sendDocument uploads in order: dicts with ``chat_id``, ``filename``,
        ``data`` (bytes), ``size``, ``caption``, ``parse_mode``, ``file_id``, ``message_id``."""
        out = []
        for c in self.calls("sendDocument"):
            if not c.ok or not _same_chat(c.params.get("chat_id"), chat_id):
                continue
            document = c.response["result"]["document"]
            with self._cond:
                stored = self._files.get(document["file_id"])
            out.append(
                {
                    "chat_id": c.params.get("chat_id"),
                    "filename": document.get("file_name"),
                    "data": stored.data if stored else b"",
                    "size": document.get("file_size"),
                    "caption": c.params.get("caption"),
                    "parse_mode": c.params.get("parse_mode"),
                    "file_id": document["file_id"],
                    "message_id": c.response["result"]["message_id"],
                }
            )
        return out

    def commands(self, scope: JSONDict | None = None, language_code: str = "") -> list[JSONDict]:
        """What setMyCommands stored for ``scope`` (default scope if None)."""
        with self._cond:
            return list(self._commands.get(_commands_key(scope, language_code), []))

    @property
    def conflicts(self) -> int:
        """How many getUpdates requests were answered 409 Conflict."""
        with self._cond:
            return self._conflicts

    @property
    def polls_waiting(self) -> int:
        """How many getUpdates requests are currently held open waiting for updates."""
        with self._cond:
            return self._polls_waiting

    @property
    def webhook_url(self) -> str:
        with self._cond:
            return self._webhook_url

    # ------------------------------------------------------------------ waiting

    def wait_for(
        self,
        predicate: Callable[[], _T],
        timeout: float = 10.0,
        description: str = "condition",
    ) -> _T:
        """Block until ``predicate()`` is truthy and return its value. It is re-checked
        whenever a request is answered, an update pushed or a long poll starts waiting.

        Raises AssertionError with a summary of the received traffic on timeout. Do not call
        this on the event loop the bot runs on; use :meth:`wait_for_async` there.
        """
        return self._wait(predicate, timeout, description, None)

    async def wait_for_async(
        self,
        predicate: Callable[[], _T],
        timeout: float = 10.0,
        description: str = "condition",
    ) -> _T:
        """:meth:`wait_for` that leaves the calling event loop free to run the bot."""
        cancelled = threading.Event()
        try:
            return await asyncio.to_thread(self._wait, predicate, timeout, description, cancelled)
        finally:
            cancelled.set()
            with self._cond:
                self._cond.notify_all()

    def wait_for_message(
        self,
        match: str | Callable[[JSONDict], object],
        chat_id: int | str | None = None,
        timeout: float = 10.0,
    ) -> JSONDict:
        """Block until a sent message matches (a substring of its text, or a predicate over
        its :meth:`sent_messages` dict) and return that message."""
        find, what = self._message_waiter(match, chat_id)
        return self.wait_for(find, timeout, what)

    async def wait_for_message_async(
        self,
        match: str | Callable[[JSONDict], object],
        chat_id: int | str | None = None,
        timeout: float = 10.0,
    ) -> JSONDict:
        """:meth:`wait_for_message` for async tests."""
        find, what = self._message_waiter(match, chat_id)
        return await self.wait_for_async(find, timeout, what)

    def _message_waiter(
        self, match: str | Callable[[JSONDict], object], chat_id: int | str | None
    ) -> tuple[Callable[[], JSONDict | None], str]:
        if isinstance(match, str):
            needle = match

            def check(m: JSONDict) -> object:
                return needle in (m.get("text") or "")

            what = f"a message containing {needle!r}"
        else:
            check = match
            what = f"a message matching {getattr(match, '__name__', repr(match))}"
        if chat_id is not None:
            what += f" to chat {chat_id}"

        def find() -> JSONDict | None:
            return next((m for m in self.sent_messages(chat_id) if check(m)), None)

        return find, what

    def _wait(
        self,
        predicate: Callable[[], _T],
        timeout: float,
        description: str,
        cancelled: threading.Event | None,
    ) -> _T:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = predicate()
                if result:
                    return result
                if cancelled is not None and cancelled.is_set():
                    raise AssertionError(f"gave up waiting for {description}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out after {timeout:g}s waiting for {description}\n" + self.summary()
                    )
                self._cond.wait(remaining)

    def summary(self, last: int = 25) -> str:
        """Human-readable account of the traffic, for assertion messages."""
        with self._cond:
            calls = list(self._calls)
            pending = len(self._updates)
        counts: dict[str, int] = {}
        for c in calls:
            counts[c.method] = counts.get(c.method, 0) + 1
        lines = [
            "stand-in received: "
            + (", ".join(f"{m} x{n}" for m, n in counts.items()) or "no requests"),
            f"updates pending (unconfirmed): {pending}; conflicts: {self._conflicts}",
        ]
        shown = [c for c in calls if c.method != "getUpdates"][-last:]
        if shown:
            lines.append(f"last {len(shown)} requests other than getUpdates:")
        for c in shown:
            params = {k: _short(v) for k, v in c.params.items()}
            files = {k: f"{name} ({len(data)} B)" for k, (name, data) in c.files.items()}
            extra = f" files={files}" if files else ""
            lines.append(f"  {c.method} -> {c.status} {params}{extra}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ failure injection

    def fail(
        self,
        method: str | None = None,
        *,
        times: int | None = None,
        status: int = 500,
        description: str = "Internal Server Error",
    ) -> None:
        """Answer ``method`` (every method but getUpdates if None) with an error, ``times``
        times (until :meth:`recover` if None)."""
        self._add_rule(_Rule(method, times, status, description))

    def flood(self, method: str | None, retry_after: int = 1, times: int | None = 1) -> None:
        """Answer ``method`` 429 Too Many Requests with ``retry_after`` (PTB: RetryAfter)."""
        self._add_rule(
            _Rule(
                method,
                times,
                429,
                f"Too Many Requests: retry after {retry_after}",
                {"retry_after": retry_after},
            )
        )

    def recover(self) -> None:
        """Drop every injected failure and flood limit."""
        with self._cond:
            self._rules.clear()

    def delay(self, method: str, seconds: float | None) -> None:
        """Make ``method`` answer ``seconds`` late (0 or None: on time again)."""
        with self._cond:
            if seconds:
                self._delays[method.lower()] = float(seconds)
            else:
                self._delays.pop(method.lower(), None)

    def handle(self, method: str, handler: MethodHandler) -> None:
        """Add or replace a method: ``handler(params, files)`` returns the ``result``
        (or raises :class:`TelegramAPIError`). It runs on the server thread."""
        with self._cond:
            self._handlers[method.lower()] = handler
            self._canonical[method.lower()] = method

    def _add_rule(self, rule: _Rule) -> None:
        if rule.remaining is not None and rule.remaining <= 0:
            return
        with self._cond:
            self._rules.append(rule)

    def _take_rule(self, method: str) -> _Rule | None:
        with self._cond:
            for rule in self._rules:
                if rule.matches(method):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                        if rule.remaining <= 0:
                            self._rules.remove(rule)
                    return rule
        return None

    # ------------------------------------------------------------------ HTTP plumbing

    async def _handle_api(self, request: web.Request) -> web.Response:
        received = time.monotonic()
        authorized = request.match_info["token"] == self._token
        with self._cond:
            method = self._canonical.get(request.match_info["method"].lower())
        method_name = method or request.match_info["method"]
        params: JSONDict = {}
        files: Files = {}
        upload_bytes = 0

        def answer(status: int, body: JSONDict) -> web.Response:
            self._record(
                Call(
                    method=method_name,
                    params=params,
                    files=files,
                    time=received,
                    status=status,
                    response=body,
                    http_method=request.method,
                    upload_bytes=upload_bytes,
                    authorized=authorized,
                )
            )
            return web.json_response(body, status=status)

        try:
            params, files, upload_bytes = await self._read_params(request)
            if not authorized:
                return answer(*_error(401, "Unauthorized"))
            if method is None:
                return answer(*_error(404, "Not Found: method not found"))
            with self._cond:
                delay = self._delays.get(method.lower(), 0.0)
            if delay and self._closing is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), delay)
            rule = self._take_rule(method)
            if rule is not None:
                return answer(*_error(rule.status, rule.description, rule.parameters))
            if upload_bytes > self.max_upload_bytes:
                return answer(*_error(413, "Request Entity Too Large"))
            if method == "getUpdates":
                status, body = await self._get_updates(params)
                return answer(status, body)
            with self._cond:
                handler = self._handlers[method.lower()]
            result = handler(params, files)
            if isinstance(result, Awaitable):
                result = await result
            return answer(200, {"ok": True, "result": result})
        except TelegramAPIError as exc:
            return answer(*_error(exc.status, exc.description, exc.parameters))
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:
            # Deliberately no request path or URL here: it holds the token.
            _LOGGER.exception("stand-in failed to answer %s", method_name)
            return answer(*_error(500, f"Internal Server Error: stand-in bug: {exc!r}"))

    async def _handle_file(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != self._token:
            return web.json_response(*_swap(_error(401, "Unauthorized")))
        path = request.match_info["path"]
        with self._cond:
            stored = next((f for f in self._files.values() if f.file_path == path), None)
        if stored is None:
            return web.json_response(*_swap(_error(404, "Not Found")))
        return web.Response(body=stored.data, content_type="application/octet-stream")

    async def _handle_unknown(self, request: web.Request) -> web.Response:
        return web.json_response(*_swap(_error(404, "Not Found")))

    async def _read_params(self, request: web.Request) -> tuple[JSONDict, Files, int]:
        """Query string plus form, multipart or JSON body.

        Multipart bodies are buffered only up to ``max_upload_bytes`` (plus room for the other
        fields); the rest of an oversized upload is drained and counted, not kept.
        """
        raw: dict[str, Any] = dict(request.query)
        files: Files = {}
        upload_bytes = 0
        ctype = request.content_type
        if not request.can_read_body:
            pass
        elif ctype.startswith("multipart/"):
            boundary = _header_param(request.headers.get("Content-Type", ""), "boundary")
            keep = self.max_upload_bytes + _MULTIPART_SLACK
            body = bytearray()
            total = 0
            async for chunk in request.content.iter_chunked(_CHUNK):
                total += len(chunk)
                if len(body) < keep:
                    body += chunk[: keep - len(body)]
            fields, files = _parse_multipart(bytes(body), (boundary or "").encode())
            raw.update(fields)
            if total > keep:  # cut off: keep the names, drop the partial contents
                files = {name: (filename, b"") for name, (filename, _) in files.items()}
                upload_bytes = total
            else:
                upload_bytes = sum(len(data) for _, data in files.values())
        elif ctype == "application/json":
            body_json = await request.json()
            if isinstance(body_json, dict):
                return {**_decode(raw), **body_json}, files, 0
        else:
            text = (await request.read()).decode("utf-8", "replace")
            raw.update(parse_qsl(text, keep_blank_values=True))
        return _decode(raw), files, upload_bytes

    def _record(self, call: Call) -> None:
        with self._cond:
            self._calls.append(call)
            if call.method == "getUpdates" and call.status == 409:
                self._conflicts += 1
            self._cond.notify_all()
        if not call.ok:
            _LOGGER.debug("stand-in answered %s with %s", call.method, call.status)

    def _call_on_loop(self, callback: Callable[[], None]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(callback)

    def _wake_poll(self) -> None:
        if self._poll is not None:
            self._poll.wake.set()

    # ------------------------------------------------------------------ getUpdates

    async def _get_updates(self, params: JSONDict) -> tuple[int, JSONDict]:
        with self._cond:
            if self._webhook_url:
                return _error(409, _CONFLICT_WEBHOOK)
        offset = _int(params.get("offset"), 0)
        limit = min(max(_int(params.get("limit"), 100), 1), 100)
        timeout = max(_float(params.get("timeout")), 0.0)

        if self._poll is not None:  # Telegram terminates the older request
            self._poll.superseded = True
            self._poll.wake.set()
        poll = _Poll()
        self._poll = poll
        waiting = False
        try:
            with self._cond:
                if offset < 0:
                    del self._updates[: max(len(self._updates) + offset, 0)]
                elif offset:
                    self._updates = [u for u in self._updates if u["update_id"] >= offset]
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                if poll.superseded:
                    return _error(409, _CONFLICT_OTHER)
                with self._cond:
                    ready = [dict(u) for u in self._updates[:limit]]
                remaining = deadline - asyncio.get_running_loop().time()
                closing = self._closing is not None and self._closing.is_set()
                if ready or remaining <= 0 or closing:
                    return 200, {"ok": True, "result": ready}
                poll.wake.clear()
                if not waiting:
                    waiting = True
                    self._count_waiting(+1)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(poll.wake.wait(), remaining)
        finally:
            if self._poll is poll:
                self._poll = None
            if waiting:
                self._count_waiting(-1)

    def _count_waiting(self, delta: int) -> None:
        with self._cond:
            self._polls_waiting += delta
            self._cond.notify_all()

    # ------------------------------------------------------------------ methods

    def _builtin_handlers(self) -> dict[str, MethodHandler]:
        return {
            "getMe": self._get_me,
            "logOut": _true,
            "close": _true,
            "getUpdates": _true,  # answered by _get_updates
            "setWebhook": self._set_webhook,
            "deleteWebhook": self._delete_webhook,
            "getWebhookInfo": self._get_webhook_info,
            "sendMessage": self._send_message,
            "editMessageText": self._edit_message_text,
            "deleteMessage": _true,
            "sendDocument": self._send_document,
            "getFile": self._get_file,
            "sendChatAction": _true,
            "answerCallbackQuery": _true,
            "setMyCommands": self._set_my_commands,
            "getMyCommands": self._get_my_commands,
            "deleteMyCommands": self._delete_my_commands,
        }

    def _bot_user(self) -> JSONDict:
        return {
            "id": self.bot_id,
            "is_bot": True,
            "first_name": self.bot_first_name,
            "username": self.bot_username,
        }

    def _get_me(self, params: JSONDict, files: Files) -> JSONDict:
        return {
            **self._bot_user(),
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
            "can_connect_to_business": False,
            "has_main_web_app": False,
        }

    def _set_webhook(self, params: JSONDict, files: Files) -> bool:
        url = params.get("url")
        if not isinstance(url, str):
            raise TelegramAPIError(400, "Bad Request: bad webhook: URL must be provided")
        with self._cond:
            self._webhook_url = url
            if params.get("drop_pending_updates") is True:
                self._updates.clear()
        return True

    def _delete_webhook(self, params: JSONDict, files: Files) -> bool:
        with self._cond:
            self._webhook_url = ""
            if params.get("drop_pending_updates") is True:
                self._updates.clear()
        return True

    def _get_webhook_info(self, params: JSONDict, files: Files) -> JSONDict:
        with self._cond:
            return {
                "url": self._webhook_url,
                "has_custom_certificate": False,
                "pending_update_count": len(self._updates),
            }

    def _chat(self, chat_id: object) -> JSONDict:
        if isinstance(chat_id, str) and not chat_id.lstrip("-").isdigit():
            if not chat_id.startswith("@"):
                raise TelegramAPIError(400, "Bad Request: chat not found")
            return {"id": -1001000000000, "type": "channel", "title": chat_id[1:]}
        try:
            cid = int(chat_id)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise TelegramAPIError(400, "Bad Request: chat_id is empty") from None
        with self._cond:
            known = self._chats.get(cid)
        if known is not None:
            return dict(known)
        if cid > 0:
            return {"id": cid, "type": "private", "first_name": "User"}
        kind = "supergroup" if str(cid).startswith("-100") else "group"
        return {"id": cid, "type": kind, "title": f"Chat {cid}"}

    def _message(self, params: JSONDict, **content: Any) -> JSONDict:
        message: JSONDict = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": self._chat(params.get("chat_id")),
            "from": self._bot_user(),
            **content,
        }
        if params.get("message_thread_id"):
            message["message_thread_id"] = params["message_thread_id"]
        if isinstance(params.get("reply_markup"), dict):
            message["reply_markup"] = params["reply_markup"]
        return message

    def _send_message(self, params: JSONDict, files: Files) -> JSONDict:
        text = params.get("text")
        if not isinstance(text, str) or not text:
            raise TelegramAPIError(400, "Bad Request: message text is empty")
        if len(text) > 4096:
            raise TelegramAPIError(400, "Bad Request: message is too long")
        return self._message(params, text=text)

    def _edit_message_text(self, params: JSONDict, files: Files) -> JSONDict | bool:
        if params.get("inline_message_id"):
            return True
        return {**self._message(params, text=params.get("text", "")), "edit_date": int(time.time())}

    def _send_document(self, params: JSONDict, files: Files) -> JSONDict:
        self._chat(params.get("chat_id"))  # reject a bad chat before storing the file
        name, data, mime = self._document_upload(params, files)
        stored = self._store_file(name, data, mime)
        document: JSONDict = {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_name": stored.file_name,
            "file_size": len(stored.data),
        }
        if mime:
            document["mime_type"] = mime
        content: JSONDict = {"document": document}
        if params.get("caption"):
            content["caption"] = params["caption"]
        return self._message(params, **content)

    def _document_upload(self, params: JSONDict, files: Files) -> tuple[str, bytes, str | None]:
        ref = params.get("document")
        if isinstance(ref, str) and ref.startswith("attach://"):
            ref = ref.removeprefix("attach://")
            if ref in files:
                return (*files[ref], None)
        if "document" in files:
            return (*files["document"], None)
        if isinstance(ref, str) and ref:
            with self._cond:
                known = self._files.get(ref)
            if known is not None:
                return known.file_name, known.data, known.mime_type
            if ref.startswith(("http://", "https://")):
                return ref.rstrip("/").rsplit("/", 1)[-1] or "file", b"", None
            raise TelegramAPIError(400, "Bad Request: wrong file identifier/HTTP URL specified")
        raise TelegramAPIError(400, "Bad Request: there is no document in the request")

    def _store_file(self, name: str, data: bytes, mime: str | None) -> _StoredFile:
        n = next(self._file_ids)
        suffix = name.rsplit(".", 1)[-1] if "." in name else "bin"
        stored = _StoredFile(
            file_id=f"BQACAgIAAxkBAAI{n:08d}",
            file_unique_id=f"AgAD{n:08d}",
            file_name=name,
            data=data,
            file_path=f"documents/file_{n}.{suffix}",
            mime_type=mime,
        )
        with self._cond:
            self._files[stored.file_id] = stored
        return stored

    def _get_file(self, params: JSONDict, files: Files) -> JSONDict:
        with self._cond:
            stored = self._files.get(str(params.get("file_id")))
        if stored is None:
            raise TelegramAPIError(400, "Bad Request: invalid file_id")
        return {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_size": len(stored.data),
            "file_path": stored.file_path,
        }

    def _set_my_commands(self, params: JSONDict, files: Files) -> bool:
        commands = params.get("commands")
        if not isinstance(commands, list):
            raise TelegramAPIError(400, "Bad Request: can't parse commands JSON object")
        key = _commands_key(params.get("scope"), params.get("language_code") or "")
        with self._cond:
            self._commands[key] = [dict(c) for c in commands]
        return True

    def _get_my_commands(self, params: JSONDict, files: Files) -> list[JSONDict]:
        return self.commands(params.get("scope"), params.get("language_code") or "")

    def _delete_my_commands(self, params: JSONDict, files: Files) -> bool:
        key = _commands_key(params.get("scope"), params.get("language_code") or "")
        with self._cond:
            self._commands.pop(key, None)
        return True


# ---------------------------------------------------------------------- helpers


def _true(params: JSONDict, files: Files) -> bool:
    return True


def _error(
    status: int, description: str, parameters: JSONDict | None = None
) -> tuple[int, JSONDict]:
    body: JSONDict = {"ok": False, "error_code": status, "description": description}
    if parameters:
        body["parameters"] = parameters
    return status, body


def _swap(pair: tuple[int, JSONDict]) -> tuple[JSONDict, int]:
    return pair[1], pair[0]


def _decode(raw: dict[str, Any]) -> JSONDict:
    """Undo PTB's JSON encoding of non-string parameters (``"42"`` -> 42, ``"true"`` -> True,
    ``"[...]"`` -> list); free-text parameters stay strings."""
    out: JSONDict = {}
    for key, value in raw.items():
        out[key] = value
        if key in _TEXT_PARAMS or not isinstance(value, str):
            continue
        try:
            decoded = json.loads(value)
        except ValueError:
            continue
        if isinstance(decoded, bool | int | float | list | dict):
            out[key] = decoded
    return out


def _header_param(header: str, name: str) -> str | None:
    message = Message()
    message["Content-Type"] = header
    value = message.get_param(name)
    return value if isinstance(value, str) else None


def _parse_multipart(body: bytes, boundary: bytes) -> tuple[dict[str, str], Files]:
    """Split a ``multipart/form-data`` body into text fields and files. A part cut off by
    buffering (an oversized upload) comes out truncated; it is rejected anyway."""
    fields: dict[str, str] = {}
    files: Files = {}
    if not boundary:
        return fields, files
    segments = (b"\r\n" + body).split(b"\r\n--" + boundary)
    for segment in segments[1:]:
        if segment.startswith(b"--"):  # the closing delimiter
            break
        head, sep, content = segment.partition(b"\r\n\r\n")
        if not sep:
            continue
        headers = Parser().parsestr(head.decode("utf-8", "replace").lstrip(" \t\r\n") + "\r\n")
        name = headers.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        filename = headers.get_filename()
        if filename is None:
            fields[name] = content.decode("utf-8", "replace")
        else:
            files[name] = (filename, content)
    return fields, files


def _int(value: object, default: int) -> int:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return default


def _float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0


def _same_chat(actual: object, wanted: int | str | None) -> bool:
    return wanted is None or str(actual) == str(wanted)


def _commands_key(scope: object, language_code: str) -> tuple[str, str]:
    if not isinstance(scope, dict) or not scope:
        scope = {"type": "default"}
    return json.dumps(scope, sort_keys=True), language_code


def _user(user_id: int, first_name: str, username: str | None) -> JSONDict:
    user: JSONDict = {"id": user_id, "is_bot": False, "first_name": first_name}
    if username:
        user["username"] = username
    return user


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _short(value: object, limit: int = 80) -> object:
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "…"
    return value
