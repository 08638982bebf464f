"""connic: serve chat agents over WebSocket, on aiohttp.

The public API lives here: the agent API (:class:`Agent`, :class:`Turn`,
:class:`Usage`, :class:`ToolCall` ...), middleware and transport base classes, configuration,
the application factories and the error hierarchy.
"""

from connic.agent import Agent, File, HistoryEntry, Progress, Session, ToolCall, ToolResult, Turn, Usage
from connic.app import RUNTIME, Runtime, build_runtime, create_app, drain, setup
from connic.config import Config, load_config, parse_config
from connic.errors import (
    AgentError,
    AgentTimeout,
    ConfigError,
    ConnicError,
    InvalidMessage,
    PluginError,
    ProtocolError,
)
from connic.middleware import CallNext, Emit, Middleware
from connic.registry import Registry, load_registry
from connic.transport import Transport

__version__ = "0.1.0"

__all__ = [
    "RUNTIME",
    "Agent",
    "AgentError",
    "AgentTimeout",
    "CallNext",
    "Config",
    "ConfigError",
    "ConnicError",
    "Emit",
    "File",
    "HistoryEntry",
    "InvalidMessage",
    "Middleware",
    "PluginError",
    "Progress",
    "ProtocolError",
    "Registry",
    "Runtime",
    "Session",
    "ToolCall",
    "ToolResult",
    "Transport",
    "Turn",
    "Usage",
    "__version__",
    "build_runtime",
    "create_app",
    "drain",
    "load_config",
    "load_registry",
    "parse_config",
    "setup",
]
