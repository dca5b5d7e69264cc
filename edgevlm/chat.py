"""OpenAI-style chat requests for `EdgeVLM.chat` and the server: messages → the chat template's messages plus
images, where images may come from (`ImagePolicy`), response formats → llama.cpp grammars, stop strings, and the
typed results.

Everything here checks a request before it waits for the model, and raises `edgevlm.errors.RequestError` (or
`ImageError`) with a message that names the bad field.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import json
import logging
import math
import os
import re
import reprlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes, urljoin, urlsplit
from urllib.request import url2pathname

from .errors import GrammarError, ImageError, ImageNotAllowedError, RequestError
from .images import ImageLimits, check_color_order, image_size, in_color_order
from .results import ChatChunk, ChatResult, GenerationStep

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")

# Bounds on what a request may ask for, checked before anything costly (llama.cpp's GBNF parser recurses once per
# nested group, and so does the JSON-schema converter per nested schema; stop matching costs time per stop string).
MAX_STOPS = 16
MAX_STOP_CHARS = 512
MAX_GRAMMAR_BYTES = 64 * 2**10
MAX_GRAMMAR_DEPTH = 1000  # nested ( ) groups; llama.cpp's parser crashed past ~18,600 on an 8 MiB stack, ~2,300 on 1 MiB
MAX_SCHEMA_BYTES = 64 * 2**10
# Largest repetition a json_schema may ask for (minLength, maxItems, a pattern's {m,n}, multiplied when nested): the
# converter writes each repetition out, ~8 bytes a unit, before the grammar's size can be checked
MAX_SCHEMA_REPEAT = 1000
MAX_IMAGES = 64  # image parts in one request
MAX_JSON_DEPTH = 64  # nesting of JSON objects and arrays in a request body or a json_schema


# ------------------------------------------------------------------------------------------------------ messages


def parse_messages(messages: Any, color_order: str = "rgb") -> tuple[list[dict[str, Any]], list[Any]]:
    """OpenAI-style `messages` → (messages for the chat template, image sources in prompt order).

    Content is a string or a list of parts: {"type": "text", "text": str}, {"type": "image_url", "image_url":
    {"url": str}} (or the URL string itself) and edgevlm's {"type": "image", "image": path, bytes, PIL image or
    array, with the optional "color_order": "rgb" or "bgr" of an array, default `color_order`}. Images go in user
    messages only. The role "developer" (newer OpenAI clients) counts as "system".
    String content becomes one text part.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise RequestError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    check_color_order(color_order)
    rendered: list[dict[str, Any]] = []
    images: list[Any] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise RequestError(f"{where} must be an object with 'role' and 'content', got {type(message).__name__}")
        role = "system" if message.get("role") == "developer" else message.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role is {message.get('role')!r}; expected one of {', '.join(ROLES)}")
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            _utf8(content, f"{where}.content")
            # as one text part: VLM templates all render parts, some (LLaVA's) render nothing for a plain string
            rendered.append({"role": role, "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, Sequence) or isinstance(content, bytes):
            raise RequestError(f"{where}.content must be a string or a list of parts, got {type(content).__name__}")
        parts = []
        for j, part in enumerate(content):
            parts.append(_parse_part(part, f"{where}.content[{j}]", role, images, color_order))
            if len(images) > MAX_IMAGES:
                raise RequestError(f"the request has more than {MAX_IMAGES} images; send at most {MAX_IMAGES}")
        rendered.append({"role": role, "content": parts})
    return rendered, images


def _parse_part(part: Any, where: str, role: str, images: list[Any], color_order: str) -> dict[str, Any]:
    if not isinstance(part, Mapping):
        raise RequestError(f"{where} must be an object with a 'type', got {type(part).__name__}")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{where}.text must be a string")
        _utf8(part["text"], f"{where}.text")
        return {"type": "text", "text": part["text"]}
    if kind in ("image_url", "image"):
        if role != "user":
            raise RequestError(f"{where}: images go in user messages, not in {role} messages")
        if kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, Mapping) else url
            if not isinstance(url, str) or not url:
                raise RequestError(f"{where}.image_url.url must be a data: URL, a path or a URL string")
            images.append(url)
        else:
            if part.get("image") is None:
                raise RequestError(f"{where}.image is missing: give a path, bytes, a PIL image or an HxWx3 array")
            images.append(in_color_order(part["image"], part.get("color_order", color_order)))
        return {"type": "image"}
    raise RequestError(f"{where}.type is {kind!r}; expected 'text', 'image_url' or 'image'")


# -------------------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImagePolicy:
    """Where image parts may come from, and how large they may be. `EdgeVLM.chat` allows any local file and no
    remote URL by default; the server allows local files only under `--allow-local-images DIR` and remote URLs only
    with `--allow-remote-images`.

    A local path must be a regular file (no FIFO, device or socket). A remote fetch has one deadline,
    `fetch_timeout_s`, for all the remote images of a request together (DNS, connect, headers and body), reads at
    most `max_bytes` per image, follows at most 3 redirects and only to the same scheme, host and port, and connects
    only to public addresses: a host that resolves to any loopback, private, link-local, multicast, unspecified or
    reserved address is refused unless `allow_private_hosts` (it connects to the address it checked, so DNS cannot
    swap it afterwards; proxy settings are not used). Every failure of the remote side gives the same message, so
    errors cannot map a network; the detail is logged at INFO. `limits` caps decoded pixels (`ImageLimits`).
    """

    allow_local: bool = True
    local_root: Path | None = None  # when set, a local path must resolve (symlinks, ..) to a file inside it
    allow_remote: bool = False
    max_bytes: int = 20 * 2**20  # most bytes fetched from a remote URL
    fetch_timeout_s: float = 10.0  # total, for all remote images of one request
    allow_private_hosts: bool = False
    limits: ImageLimits = field(default_factory=ImageLimits)


def resolve_images(sources: Sequence[Any], policy: ImagePolicy) -> list[Any]:
    """`resolve_image` of each source, the remote ones fetched within one deadline of `policy.fetch_timeout_s`."""
    deadline = time.monotonic() + policy.fetch_timeout_s
    return [resolve_image(source, policy, deadline=deadline) for source in sources]


def resolve_image(source: Any, policy: ImagePolicy, *, deadline: float | None = None) -> Any:
    """An image part's source as `load_image` takes it: a `data:` URL becomes bytes, a remote URL is fetched (if
    allowed; by `deadline`, a `time.monotonic()` value, default `policy.fetch_timeout_s` from now), a path or
    file:// URL is checked against the policy; bytes, PIL images and arrays pass through."""
    if isinstance(source, str):
        if source[:5].lower() == "data:":
            return decode_data_url(source)
        _utf8(source, "the image URL")
        try:
            scheme = urlsplit(source).scheme.lower()
        except ValueError as err:  # e.g. "Invalid IPv6 URL"
            raise ImageError(f"the image URL {source[:200]!r} does not parse ({err}); send a data: URL, an "
                             "http(s) URL or a path") from err  # fmt: skip
        if scheme in ("http", "https"):
            if not policy.allow_remote:
                raise ImageNotAllowedError(f"remote image URLs are not allowed here ({source[:80]}); send the image "
                                           "as a data: URL (a server allows them with --allow-remote-images)")  # fmt: skip
            return _fetch(source, policy, time.monotonic() + policy.fetch_timeout_s if deadline is None else deadline)
        if scheme == "file":
            return _local_path(url2pathname(urlsplit(source).path), policy)
        if len(scheme) > 1:  # one letter: a Windows drive
            raise ImageError(f"image URL scheme {scheme!r} is not supported; use a data: URL, http(s) or a path")
        return _local_path(source, policy)
    if isinstance(source, os.PathLike):
        return _local_path(source, policy)
    return source


def decode_data_url(url: str) -> bytes:
    """The bytes of a `data:[<mediatype>][;base64],<data>` URL."""
    header, comma, payload = url.partition(",")
    if not comma:
        raise RequestError("the data: URL has no ',' before its data; expected data:image/png;base64,<base64 bytes>")
    if header.lower().endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise RequestError(f"the data: URL's base64 does not decode ({err}); send the image file's bytes "
                             "base64-encoded, e.g. data:image/png;base64,iVBORw0...") from err  # fmt: skip
    return unquote_to_bytes(payload)


# PATH_MAX and NAME_MAX on Linux: longer paths fail in stat() and open() with "File name too long"
MAX_PATH_CHARS = 4096
MAX_NAME_CHARS = 255


def _local_path(path: str | os.PathLike, policy: ImagePolicy) -> Path:
    if not policy.allow_local:
        raise ImageNotAllowedError("local image paths are not allowed here; send the image as a data: URL "
                                   "(a server allows a directory with --allow-local-images DIR)")  # fmt: skip
    text = os.fspath(path)
    if ("\0" if isinstance(text, str) else b"\0") in text:
        raise ImageError("the image path contains a NUL byte, which no file name can; send a valid path or a data: URL")
    longest_name = max((len(name) for name in Path(text).parts), default=0)
    if len(text) > MAX_PATH_CHARS or longest_name > MAX_NAME_CHARS:
        raise ImageError(f"the image path ({len(text)} characters, a name of {longest_name}) is longer than a path "
                         f"({MAX_PATH_CHARS}) or a file name ({MAX_NAME_CHARS}) may be; send a valid path or a data: "
                         "URL")  # fmt: skip
    if policy.local_root is None:
        return Path(path)
    root = Path(policy.local_root).resolve()
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise ImageNotAllowedError(f"image path {str(path)[:200]!r} is outside the directory this server allows "
                                   "images from; give a path inside it, relative to it, or a data: URL")  # fmt: skip
    return resolved


_MAX_REDIRECTS = 3
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_DEFAULT_PORTS = {"http": 80, "https": 443}


class _FetchFailed(Exception):
    """Why a fetch failed, for the log only: the caller sees one message whatever the reason."""


def _fetch(url: str, policy: ImagePolicy, deadline: float) -> bytes:
    """The image bytes at `url`, or one ImageError for every failure of the remote side (detail logged at INFO)."""
    target = url
    try:
        for _ in range(_MAX_REDIRECTS + 1):
            status, location, body = _fetch_once(target, policy, deadline)
            if status not in _REDIRECT_STATUSES:
                break
            target = _same_origin_redirect(target, location)
        else:
            raise _FetchFailed(f"more than {_MAX_REDIRECTS} redirects")
        if status != 200:
            raise _FetchFailed(f"HTTP status {status}")
        image_size(body)  # not an image: the same failure as any other
        return body
    except (_FetchFailed, OSError, http.client.HTTPException, ValueError) as err:  # ImageError is a ValueError
        if isinstance(err, ImageNotAllowedError):
            raise
        logger.info("fetching the image %s failed: %s: %s", target[:200], type(err).__name__, err)
        raise ImageError(f"could not fetch an image from {url[:200]}: no image of at most {policy.max_bytes} bytes "
                         f"arrived within {policy.fetch_timeout_s:g} s. Check the URL, or send the image as a data: "
                         "URL") from err  # fmt: skip


def _same_origin_redirect(url: str, location: str | None) -> str:
    target = urljoin(url, location or "")
    if not location or _origin(target) != _origin(url):
        raise _FetchFailed(f"redirect to another scheme, host or port refused ({target[:200]})")
    return target


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme, 0)


def _fetch_once(url: str, policy: ImagePolicy, deadline: float) -> tuple[int, str | None, bytes]:
    """(status, Location header, body) of one GET; the whole exchange ends by `deadline` (a watchdog shuts the
    socket then: per-read timeouts alone let a server trickle one byte at a time for ever)."""
    scheme, host, port = _origin(url)
    if scheme not in _DEFAULT_PORTS or not host:
        raise _FetchFailed("not an http(s) URL with a host")
    connection_class = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    connection = connection_class(host, port)
    connection.sock = _connect(host, port, policy, deadline)  # connected to the address that was checked
    # The watchdog's own descriptor of the connection: TLS wrapping and http.client replace or drop `sock`.
    guard = connection.sock.dup()
    expired = threading.Event()
    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _expire, (guard, expired))
    watchdog.daemon = True
    watchdog.start()
    try:
        if scheme == "https":
            connection.sock = ssl.create_default_context().wrap_socket(connection.sock, server_hostname=host)
        parts = urlsplit(url)
        connection.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                           headers={"User-Agent": "edgevlm", "Accept": "image/*", "Accept-Encoding": "identity"})  # fmt: skip
        response = connection.getresponse()
        if response.status != 200:
            return response.status, response.getheader("Location"), b""
        body = _read_body(response, policy.max_bytes)
        if expired.is_set():  # the body may look complete when the watchdog cut it
            raise _FetchFailed(f"the deadline of {policy.fetch_timeout_s:g} s passed")
        return response.status, None, body
    except OSError as err:
        if expired.is_set():
            raise _FetchFailed(f"the deadline of {policy.fetch_timeout_s:g} s passed") from err
        raise
    finally:
        watchdog.cancel()
        connection.close()
        guard.close()


def _read_body(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    declared = response.getheader("Content-Length", "")
    if declared.strip().isdigit() and int(declared) > max_bytes:
        raise _FetchFailed(f"Content-Length {declared} is above {max_bytes} bytes")
    body = bytearray()
    while piece := response.read(min(2**16, max_bytes + 1 - len(body))):
        body += piece
        if len(body) > max_bytes:
            raise _FetchFailed(f"the body is longer than {max_bytes} bytes")
    return bytes(body)


def _expire(guard: socket.socket, expired: threading.Event) -> None:
    expired.set()
    try:
        guard.shutdown(socket.SHUT_RDWR)  # a blocked read on the connection returns at once
    except OSError:
        pass  # the connection is already closed


def _connect(host: str, port: int, policy: ImagePolicy, deadline: float) -> socket.socket:
    """A socket connected to one of `host`'s addresses, all of which were checked first."""
    addresses = _resolve(host, port, deadline)
    if not policy.allow_private_hosts:
        for *_, sockaddr in addresses:
            ip = ipaddress.ip_address(sockaddr[0])
            if not _is_public(ip):
                logger.info("image host %r resolves to %s, which is not public: refused", host, ip)
                raise ImageNotAllowedError(
                    f"the image host {host!r} is not at a public address, and only public ones are fetched from (a "
                    "guard against reaching internal services); use a public "
                    "URL or send the image as a data: URL (servers allow such hosts with --allow-private-image-hosts, "
                    "Python with ImagePolicy(allow_private_hosts=True))"
                )
    failure: OSError = OSError("no address")
    for family, kind, proto, _, sockaddr in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            sock.close()
            failure = err
    raise failure


def _resolve(host: str, port: int, deadline: float) -> list[tuple]:
    """getaddrinfo of `host` by `deadline` (in a thread: the system resolver has no timeout of its own)."""
    found: list[Any] = []
    lookup = threading.Thread(target=lambda: found.append(_getaddrinfo(host, port)), daemon=True)
    lookup.start()
    lookup.join(max(0.0, deadline - time.monotonic()))
    if not found:
        raise _FetchFailed(f"no answer from DNS for {host!r} in time")
    if isinstance(found[0], OSError):
        raise found[0]
    return found[0]


def _getaddrinfo(host: str, port: int) -> list[tuple] | OSError:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        return err


# IPv6 prefixes that carry an IPv4 address in their low 32 bits (NAT64 well-known prefix).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A globally routable unicast address; IPv6 forms that embed an IPv4 address are judged by it too."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # reaches the IPv4 address itself
            return _is_public(ip.ipv4_mapped)
        embedded = ip.sixtofour or (ip.teredo or (None, None))[1]
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not _is_public(embedded):
            return False
        if ip.is_site_local:
            return False
    special = ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved  # fmt: skip
    return ip.is_global and not special


# ------------------------------------------------------------------------------------------- sampling and format


def check_sampling(*, max_tokens: Any, temperature: Any, top_p: Any, top_k: Any, seed: Any, max_image_tokens: Any,
                   timeout: Any = None) -> None:  # fmt: skip
    """Refuse sampling parameters of the wrong type or range (they often come straight from JSON)."""
    _number("max_tokens", max_tokens, int, 1)
    _number("temperature", temperature, float, 0.0)
    _number("top_p", top_p, float, 0.0, 1.0)
    _number("top_k", top_k, int, 0)
    if seed is not None:
        _number("seed", seed, int, 0)
    if max_image_tokens is not None:
        _number("max_image_tokens", max_image_tokens, int, 1)
    if timeout is not None:
        _number("timeout", timeout, float, 0.0)
        if timeout == 0:
            raise RequestError("timeout must be > 0 seconds (None: no timeout), got 0")


def _number(name: str, value: Any, kind: type, low: float, high: float | None = None) -> None:
    ok_type = (int,) if kind is int else (int, float)
    # an int is range-checked as it is: math.isfinite() of a 400-digit one overflows
    if isinstance(value, bool) or not isinstance(value, ok_type) or (isinstance(value, float) and not math.isfinite(value)):
        raise RequestError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise RequestError(f"{name} must be {bounds}, got {value!r}")


def parse_stop(stop: Any) -> tuple[str, ...]:
    """`stop` as a tuple of non-empty strings (None: none): at most `MAX_STOPS` of at most `MAX_STOP_CHARS` each."""
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, Sequence) or isinstance(stops, bytes):
        raise RequestError(f"stop must be a non-empty string or a list of them, got {reprlib.repr(stop)}")
    if len(stops) > MAX_STOPS:
        raise RequestError(f"stop has {len(stops)} strings; at most {MAX_STOPS} are allowed")
    if not all(isinstance(s, str) and s for s in stops):
        raise RequestError(f"stop must be a non-empty string or a list of them, got {reprlib.repr(stop)}")
    longest = max((len(s) for s in stops), default=0)
    if longest > MAX_STOP_CHARS:
        raise RequestError(f"a stop string is {longest} characters long; at most {MAX_STOP_CHARS} are allowed")
    return tuple(stops)


def grammar_for(response_format: Any) -> str | None:
    """The GBNF grammar a `response_format` asks for, or None for free text.

    {"type": "text"}; {"type": "json_object"}: any JSON object; {"type": "json_schema", "json_schema": {"schema":
    {...}}}: JSON valid against the schema (llama.cpp's converter: types, properties, required, enum, const,
    bounded arrays and integers, patterns, $ref); edgevlm's {"type": "gbnf", "grammar": "root ::= ..."}.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise RequestError(f"response_format must be an object with a 'type', got {response_format!r}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    from llama_cpp import llama_grammar

    if kind == "json_object":
        return llama_grammar.JSON_GBNF
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise RequestError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        check_json_depth(schema, MAX_JSON_DEPTH, "response_format json_schema")
        try:
            schema_json = json.dumps(schema)
        except (TypeError, ValueError) as err:
            raise GrammarError(f"response_format json_schema is not JSON ({err})") from err
        if len(schema_json) > MAX_SCHEMA_BYTES:
            raise GrammarError(f"response_format json_schema is {len(schema_json)} characters as JSON; at most "
                               f"{MAX_SCHEMA_BYTES} are allowed")  # fmt: skip
        _refuse_unenforced(schema, "schema")
        _refuse_large_repeats(schema)
        try:
            grammar = llama_grammar.json_schema_to_gbnf(schema_json)
        except Exception as err:  # the converter raises bare ValueError/KeyError/... on what it cannot handle
            raise GrammarError(f"response_format json_schema: cannot turn this schema into a grammar "
                               f"({type(err).__name__}: {err})") from err  # fmt: skip
        check_grammar_limits(grammar, "the grammar made from response_format json_schema")
        return grammar
    if kind == "gbnf":
        grammar = response_format.get("grammar")
        if not isinstance(grammar, str) or not grammar.strip():
            raise RequestError("response_format gbnf needs {'type': 'gbnf', 'grammar': 'root ::= ...'}")
        check_grammar_limits(grammar, "response_format gbnf grammar")
        return grammar
    raise RequestError(f"response_format type {reprlib.repr(kind)} is not supported; use 'text', 'json_object', "
                       "'json_schema' or 'gbnf'")  # fmt: skip


_REPEAT_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_QUANTIFIER = re.compile(r"\{(\d+)(?:,(\d*))?\}")


def _refuse_large_repeats(schema: Any) -> None:
    """Refuse repetitions above `MAX_SCHEMA_REPEAT` in a json_schema (the depth is checked already, so a loop)."""
    for level in _json_levels(schema):
        for node in (n for n in level if isinstance(n, Mapping)):
            for key in _REPEAT_KEYWORDS:
                value = node.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_SCHEMA_REPEAT:
                    raise GrammarError(f"response_format json_schema: {key}={value}, but grammars are built with at "
                                       f"most {MAX_SCHEMA_REPEAT} repetitions; use a smaller bound")  # fmt: skip
            pattern = node.get("pattern")
            if isinstance(pattern, str):
                repeats = 1
                for low, comma, high in ((m.group(1), "," in m.group(0), m.group(2)) for m in _QUANTIFIER.finditer(pattern)):  # fmt: skip
                    repeats *= max(int(low), int(high) if comma and high else 1)
                if repeats > MAX_SCHEMA_REPEAT:
                    raise GrammarError(f"response_format json_schema: the pattern {pattern[:80]!r} repeats {repeats} "
                                       f"times in all; at most {MAX_SCHEMA_REPEAT} are allowed")  # fmt: skip


# The parts of GBNF that can hold parentheses which do not group: "literals", [character classes] and # comments.
_GBNF_TOKENS = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\r\n]*|[()]')


def check_grammar_limits(grammar: str, what: str) -> None:
    """Refuse a GBNF grammar larger than `MAX_GRAMMAR_BYTES` or with groups nested deeper than `MAX_GRAMMAR_DEPTH`,
    before llama.cpp's recursive parser sees it (nested deeply enough, it overflows the stack and kills the process).
    """
    size = len(_utf8(grammar, what))
    if size > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"{what} is {size} bytes; at most {MAX_GRAMMAR_BYTES} are allowed")
    depth = deepest = 0
    for token in _GBNF_TOKENS.finditer(grammar):
        depth += {"(": 1, ")": -1}.get(token.group(), 0)
        deepest = max(deepest, depth)
    if deepest > MAX_GRAMMAR_DEPTH:
        raise GrammarError(f"{what} nests ( ) groups {deepest} deep; at most {MAX_GRAMMAR_DEPTH} are allowed")


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON's \ud800 escapes make lone surrogates, which no UTF-8 encodes
        raise RequestError(f"{what} is not valid Unicode ({err.reason} at character {err.start})") from err


def check_json_depth(value: Any, limit: int, what: str) -> None:
    """Refuse JSON-like data (dicts and lists) nested deeper than `limit`, without recursing (cycles included)."""
    for depth, _ in enumerate(_json_levels(value), 1):
        if depth > limit:
            raise RequestError(f"{what} nests objects and arrays more than {limit} deep; flatten it")


def _json_levels(value: Any) -> Iterator[list[Any]]:
    """The objects and arrays (dicts, lists, tuples) of JSON-like data, level by level from the top, without
    recursing (a consumer that stops early never walks the rest)."""
    level: list[Any] = [value]
    while level := [v for v in level if isinstance(v, (Mapping, list, tuple))]:
        yield level
        level = [child for container in level for child in (container.values() if isinstance(container, Mapping) else container)]  # fmt: skip


# Keywords llama-cpp-python's schema converter ignores: a grammar made without them lets invalid output through.
_UNENFORCED = (
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems", "contains",
    "minContains", "maxContains", "minProperties", "maxProperties", "patternProperties", "propertyNames",
    "dependentRequired", "dependentSchemas", "not", "if", "then", "else",
)  # fmt: skip
_NAMED_SCHEMAS = ("properties", "$defs", "definitions")  # their keys are names, their values schemas


def _refuse_unenforced(schema: Any, where: str) -> None:
    if isinstance(schema, Sequence) and not isinstance(schema, str):
        for i, item in enumerate(schema):
            _refuse_unenforced(item, f"{where}[{i}]")
        return
    if not isinstance(schema, Mapping):
        return
    for key, value in schema.items():
        if key in _UNENFORCED:
            raise GrammarError(f"response_format json_schema: {key!r} at {where} cannot be enforced by the grammar, "
                               "so answers could break it; use an enum or a pattern instead")  # fmt: skip
        if key in _NAMED_SCHEMAS and isinstance(value, Mapping):
            for name, sub in value.items():
                _refuse_unenforced(sub, f"{where}.{key}.{name}")
        elif key not in ("enum", "const", "default", "examples"):
            _refuse_unenforced(value, f"{where}.{key}")


# --------------------------------------------------------------------------------------------------- results


def stop_at(steps: Iterator[GenerationStep], stops: tuple[str, ...]) -> Iterator[ChatChunk]:
    """Chunks of the generated text, ending before the first stop string (finish_reason "stop").

    Text that could be the start of a stop string is held back until it is known not to be one. Each new character
    costs O(len(stops)) (amortized), however long the stop strings and the answer are. Closing this iterator, or
    reaching a stop string, closes `steps` (which frees the model for the next request).
    """
    scanner = _StopScanner(stops)
    pending = ""  # generated text not yet given out: at most the longest stop string, plus the newest step
    try:
        for step in steps:
            pending += step.text
            match_back = scanner.feed(step.text)
            if match_back is not None:
                yield ChatChunk(pending[: len(pending) - match_back], "stop", step.timings)
                return
            if step.finish_reason is not None:
                yield ChatChunk(pending, step.finish_reason, step.timings)
                return
            if len(pending) > scanner.held:
                yield ChatChunk(pending[: len(pending) - scanner.held], None, step.timings)
                pending = pending[len(pending) - scanner.held :]
    finally:
        steps.close()


class _StopScanner:
    """Finds stop strings in text that arrives in pieces: one Knuth-Morris-Pratt automaton per stop string, whose
    state is how many of its first characters the text so far ends with."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.failure = [_prefix_function(s) for s in stops]
        self.matched = [0] * len(stops)

    @property
    def held(self) -> int:
        """How many of the last characters could still begin a stop string."""
        return max(self.matched, default=0)

    def feed(self, text: str) -> int | None:
        """Advance over `text`; the distance from the earliest-starting stop string found to the end of `text`, or
        None when none ends in it."""
        back = None
        for i, (stop, failure) in enumerate(zip(self.stops, self.failure, strict=True)):
            k = self.matched[i]
            for j, char in enumerate(text):
                while k and stop[k] != char:
                    k = failure[k - 1]
                if stop[k] == char:
                    k += 1
                if k == len(stop):
                    back = max(back or 0, len(text) - j - 1 + len(stop))
                    break
            self.matched[i] = k
        return back


def _prefix_function(text: str) -> list[int]:
    """For each prefix of `text`, the length of its longest proper prefix that is also its suffix."""
    failure = [0] * len(text)
    k = 0
    for i in range(1, len(text)):
        while k and text[k] != text[i]:
            k = failure[k - 1]
        if text[k] == text[i]:
            k += 1
        failure[i] = k
    return failure


def collect(chunks: Iterator[ChatChunk]) -> ChatResult:
    """The whole answer of a chunk stream."""
    text = []
    for chunk in chunks:
        text.append(chunk.text)
        if chunk.finish_reason is not None:
            return ChatResult("".join(text), chunk.finish_reason, chunk.timings)
    raise RuntimeError("the generation ended without a finish reason")
