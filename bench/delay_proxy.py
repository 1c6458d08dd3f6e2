"""A TCP proxy that delays every chunk by a fixed time in each direction, order preserved.

P5 uses it where the kernel has no `netem` qdisc (this VM's does not): `tbf` limits the rate and this
adds the latency. usage: delay_proxy.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_S
"""
import asyncio
import sys


async def pipe(reader, writer, delay):
    queue = asyncio.Queue()

    async def deliver():
        while True:
            due, data = await queue.get()
            wait = due - asyncio.get_running_loop().time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                writer.close()
                return
            writer.write(data)
            await writer.drain()

    task = asyncio.create_task(deliver())
    loop = asyncio.get_running_loop()
    while True:
        data = await reader.read(65536)
        await queue.put((loop.time() + delay, data or None))
        if not data:
            break
    await task


async def main():
    lhost, lport, thost, tport, delay = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])

    async def handle(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection(thost, tport)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            pipe(client_reader, server_writer, delay), pipe(server_reader, client_writer, delay), return_exceptions=True
        )

    server = await asyncio.start_server(handle, lhost, lport)
    async with server:
        await server.serve_forever()


asyncio.run(main())
