import NIOCore

/// The human monitor on a socket (QEMU's `-mon mode=readline`): a banner and the `(qemu) `
/// prompt, then one command per line, answered with the same text `human-monitor-command`
/// returns. Lives on the channel's event loop; commands run on the connection's queue one at a
/// time, and nothing more is read while a line waits (so a flooding client is throttled by
/// socket backpressure). A line longer than `maxLineLength` is refused and skipped.
final class HMPChannelHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer

    /// QEMU's prompt.
    static let prompt = "(qemu) "
    /// The longest command line accepted.
    static let maxLineLength = 4096

    private let server: QMPServer
    private var connection: QMPConnection?
    private var partial: [UInt8] = []
    private var discarding = false
    private var lines: [String] = []
    private var busy = false

    init(server: QMPServer) { self.server = server }

    func channelActive(context: ChannelHandlerContext) {
        let c = server.makeConnection(channel: context.channel)
        connection = c
        let v = server.version.qemu
        c.sendText("QEMU \(v.major).\(v.minor).\(v.micro) monitor - type 'help' for more information\r\n" + Self.prompt)
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        for byte in buffer.readableBytesView {
            if byte == UInt8(ascii: "\n") {
                if discarding {
                    discarding = false
                    connection?.sendText("line too long (over \(Self.maxLineLength) bytes)\r\n" + Self.prompt)
                } else {
                    if partial.last == UInt8(ascii: "\r") { partial.removeLast() }
                    lines.append(String(decoding: partial, as: UTF8.self))
                }
                partial.removeAll(keepingCapacity: true)
            } else if !discarding {
                partial.append(byte)
                if partial.count > Self.maxLineLength {
                    discarding = true
                    partial.removeAll()
                }
            }
        }
        pump(context: context)
    }

    func read(context: ChannelHandlerContext) {
        if lines.isEmpty && !busy { context.read() }
    }

    func channelInactive(context: ChannelHandlerContext) {
        if let c = connection { server.remove(c) }
        connection = nil
        lines = []
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    private func pump(context: ChannelHandlerContext) {
        guard let c = connection, !busy else { return }
        guard !lines.isEmpty else {
            context.read()
            return
        }
        busy = true
        let line = lines.removeFirst()
        let loop = context.eventLoop
        let bound = NIOLoopBound((self, context), eventLoop: loop)
        c.performHumanMonitor(line) {
            loop.execute {
                let (handler, ctx) = bound.value
                handler.busy = false
                handler.pump(context: ctx)
            }
        }
    }
}
