"""The seed page's examples, verbatim but for the URL and secret, against a real server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import CliServer

SEED_PYTHON = '''\
import asyncio
import websockets
import json

async def chat():
    uri = "<websocket-url>"
    
    async with websockets.connect(uri) as ws:
        # Authenticate
        await ws.send(json.dumps({"secret": "<your-secret-key>"}))
        response = await ws.recv()
        print(f"Connected: {json.loads(response)}")
        
        # Send message
        await ws.send(json.dumps({"message": "Hello!"}))
        
        # Receive streaming response
        while True:
            msg = await ws.recv()
            data = json.loads(msg)
            if data["type"] == "stream_chunk":
                print(data["chunk"], end="", flush=True)
            elif data["type"] == "stream_end":
                print(f"\\nDone! Tokens: {data['token_usage']}")
                break

asyncio.run(chat())
'''


def test_seed_python_example_against_cli(cli: Callable[..., CliServer], tmp_path: Path) -> None:
    server = cli()
    assert server.secret, server.banner
    script = SEED_PYTHON.replace("<websocket-url>", server.url).replace("<your-secret-key>", server.secret)
    path = tmp_path / "chat.py"
    path.write_text(script)
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Connected: {'type': 'connected', 'session_id': ")
    assert "'agents': ['echo']" in lines[0]
    assert lines[1] == "Hello!"
    assert lines[2] == "Done! Tokens: {'prompt_tokens': 1, 'candidates_tokens': 1}"
    code, out = server.stop()
    assert code == 0, out
