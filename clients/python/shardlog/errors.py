"""Errors of the shardlog client: one exception class per wire ``ErrorCode``.

Every class derives from :class:`ServerError` (and that from :class:`ShardlogError`), so a caller
catches one code (``except Busy``), any daemon error (``except ServerError``), or anything the
client raises (``except ShardlogError``). The classes are named exactly as the codes in
``proto/schema/shardlog.fbs``; a code this client does not know becomes a plain ``ServerError``.
"""

from typing import Dict, Optional, Type

from .wire.ErrorCode import ErrorCode


class ShardlogError(Exception):
    """Anything the client raises."""


class ConnectionClosed(ShardlogError):
    """The daemon closed the connection (or it broke) before the answer came."""


class ProtocolError(ShardlogError):
    """An answer could not be decoded, or was not the message the request expects."""


class ServerError(ShardlogError):
    """The daemon answered with an ``Error``."""

    #: The wire code this class stands for (``None`` on the base class).
    CODE: Optional[int] = None

    def __init__(self, code: int, message: str = "", first_available_lsn: Optional[int] = None):
        self.code = code
        self.message = message
        #: With ``Truncated``: the shard's first retained lsn, where a reader continues.
        self.first_available_lsn = first_available_lsn
        name = _NAMES.get(code, "Unknown")
        text = f"shardlogd answered {name} ({code})"
        if message:
            text += f": {message}"
        super().__init__(text)


class BadRequest(ServerError):
    CODE = ErrorCode.BadRequest


class FrameTooLarge(ServerError):
    CODE = ErrorCode.FrameTooLarge


class UnsupportedVersion(ServerError):
    CODE = ErrorCode.UnsupportedVersion


class UnknownMessage(ServerError):
    CODE = ErrorCode.UnknownMessage


class NoSuchShard(ServerError):
    CODE = ErrorCode.NoSuchShard


class Truncated(ServerError):
    CODE = ErrorCode.Truncated


class Poisoned(ServerError):
    CODE = ErrorCode.Poisoned


class NoSpace(ServerError):
    CODE = ErrorCode.NoSpace


class TooManyConnections(ServerError):
    CODE = ErrorCode.TooManyConnections


class ShuttingDown(ServerError):
    CODE = ErrorCode.ShuttingDown


class Corruption(ServerError):
    CODE = ErrorCode.Corruption


class TooLarge(ServerError):
    CODE = ErrorCode.TooLarge


class Internal(ServerError):
    CODE = ErrorCode.Internal


class Busy(ServerError):
    CODE = ErrorCode.Busy


#: Wire code -> exception class.
BY_CODE: Dict[int, Type[ServerError]] = {
    cls.CODE: cls for cls in ServerError.__subclasses__() if cls.CODE is not None
}

_NAMES = {value: name for name, value in vars(ErrorCode).items() if not name.startswith("_")}


def error_for(code: int, message: str = "", first_available_lsn: Optional[int] = None) -> ServerError:
    """The exception for a daemon ``Error`` with this code."""
    return BY_CODE.get(code, ServerError)(code, message, first_available_lsn)
