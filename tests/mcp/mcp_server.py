"""A small MCP server (the official `mcp` SDK, streamable HTTP transport) for the keyholder's e2e
test of `/v1/proxy`: `python mcp_server.py <port> [json]` serves http://127.0.0.1:<port>/mcp; with
`json` it answers requests as single JSON bodies (the transport's JSON mode) instead of SSE."""

import asyncio
import sys

from mcp.server.fastmcp import Context, FastMCP

port = int(sys.argv[1])
json_mode = len(sys.argv) > 2 and sys.argv[2] == "json"
server = FastMCP("keyholder-e2e", host="127.0.0.1", port=port, json_response=json_mode,
                 log_level="WARNING")
tickers = []


@server.tool()
def echo(text: str) -> str:
    """Returns its input."""
    return text


@server.tool()
async def count(steps: int, interval: float, ctx: Context) -> str:
    """Reports progress `steps` times, `interval` seconds apart, then answers."""
    for i in range(steps):
        await ctx.report_progress(i + 1, steps, "step %d" % (i + 1))
        await asyncio.sleep(interval)
    return "counted %d" % steps


@server.tool()
async def start_ticker(interval: float, ctx: Context) -> str:
    """Sends `notifications/tools/list_changed` on the session's GET stream (no related request)
    at once and then every `interval` seconds."""
    session = ctx.session

    async def tick():
        await asyncio.sleep(0.1)
        while True:
            await session.send_tool_list_changed()
            await asyncio.sleep(interval)

    tickers.append(asyncio.get_running_loop().create_task(tick()))
    return "ticking"


if __name__ == "__main__":
    server.run(transport="streamable-http")
