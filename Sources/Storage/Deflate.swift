import CZlib

/// Raw deflate (no zlib header, 4 KiB window: `windowBits = -12`), as QEMU's qcow2 uses for
/// compressed clusters. Pure functions; any thread.
enum Deflate {
    /// Inflates `input` into exactly `output.count` bytes. Trailing input (sector padding) is
    /// allowed, as QEMU allows it. Returns false when the data is not valid deflate or too short.
    static func inflateCluster(_ input: [UInt8], into output: UnsafeMutableRawBufferPointer) -> Bool {
        var s = z_stream()
        guard inflateInit2_(&s, -12, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else { return false }
        defer { inflateEnd(&s) }
        return input.withUnsafeBytes { inBuf -> Bool in
            s.next_in = UnsafeMutablePointer(mutating: inBuf.bindMemory(to: Bytef.self).baseAddress)
            s.avail_in = uInt(inBuf.count)
            s.next_out = output.bindMemory(to: Bytef.self).baseAddress
            s.avail_out = uInt(output.count)
            let r = inflate(&s, Z_FINISH)
            guard r == Z_STREAM_END || (r == Z_BUF_ERROR && s.avail_out == 0) else { return false }
            return s.avail_out == 0
        }
    }

    /// Compresses `input`; returns nil when the result would not be smaller than the input.
    static func deflateCluster(_ input: UnsafeRawBufferPointer) -> [UInt8]? {
        var s = z_stream()
        guard deflateInit2_(&s, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY,
                            zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else { return nil }
        defer { deflateEnd(&s) }
        var out = [UInt8](repeating: 0, count: max(0, input.count - 1))
        let n = out.withUnsafeMutableBytes { outBuf -> Int? in
            s.next_in = UnsafeMutablePointer(mutating: input.bindMemory(to: Bytef.self).baseAddress)
            s.avail_in = uInt(input.count)
            s.next_out = outBuf.bindMemory(to: Bytef.self).baseAddress
            s.avail_out = uInt(outBuf.count)
            guard deflate(&s, Z_FINISH) == Z_STREAM_END else { return nil }
            return outBuf.count - Int(s.avail_out)
        }
        guard let n else { return nil }
        out.removeLast(out.count - n)
        return out
    }
}
