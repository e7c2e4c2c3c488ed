import Glibc

/// A bounded first-in first-out queue of bytes in one fixed ring allocation.
///
/// A value type with no locking of its own: each backend keeps it inside its `Mutex`.
/// Invariant: `count <= capacity`; bytes leave in the order they arrived.
struct ByteQueue {
    private var storage: [UInt8]
    private var head = 0
    /// Number of bytes queued.
    private(set) var count = 0

    /// Creates an empty queue that holds at most `capacity` bytes (at least 1).
    init(capacity: Int) {
        storage = [UInt8](repeating: 0, count: max(1, capacity))
    }

    /// The most bytes the queue holds.
    var capacity: Int { storage.count }
    /// True when no bytes are queued.
    var isEmpty: Bool { count == 0 }

    /// Appends as many bytes as fit and returns how many did not fit (dropped, newest lost).
    @discardableResult
    mutating func append(_ bytes: UnsafeRawBufferPointer) -> Int {
        let n = min(bytes.count, capacity - count)
        var tail = (head + count) % capacity
        for i in 0..<n {
            storage[tail] = bytes[i]
            tail += 1
            if tail == capacity { tail = 0 }
        }
        count += n
        return bytes.count - n
    }

    /// Appends every byte, discarding the oldest queued bytes to make room (a ring buffer);
    /// returns how many old bytes were overwritten.
    @discardableResult
    mutating func appendOverwriting(_ bytes: UnsafeRawBufferPointer) -> Int {
        var lost = 0
        var src = bytes
        if src.count > capacity {
            lost += src.count - capacity
            src = UnsafeRawBufferPointer(rebasing: src[(src.count - capacity)...])
        }
        let overflow = max(0, count + src.count - capacity)
        if overflow > 0 { drop(overflow); lost += overflow }
        append(src)
        return lost
    }

    /// Removes and returns up to `maxCount` of the oldest bytes.
    mutating func removeFirst(upTo maxCount: Int) -> [UInt8] {
        let n = min(maxCount, count)
        var out = [UInt8]()
        out.reserveCapacity(n)
        for i in 0..<n { out.append(storage[(head + i) % capacity]) }
        drop(n)
        return out
    }

    /// Calls `body` with the oldest contiguous run of queued bytes (possibly fewer than `count`
    /// when the data wraps around); `body` returns how many of them were consumed.
    mutating func consumeContiguous(_ body: (UnsafeRawBufferPointer) -> Int) {
        guard count > 0 else { return }
        let run = min(count, capacity - head)
        let used = storage.withUnsafeBytes { all in
            body(UnsafeRawBufferPointer(rebasing: all[head..<(head + run)]))
        }
        drop(min(max(used, 0), run))
    }

    /// Discards the `n` oldest bytes.
    mutating func drop(_ n: Int) {
        let k = min(n, count)
        head = (head + k) % capacity
        count -= k
        if count == 0 { head = 0 }
    }

    /// Discards everything.
    mutating func removeAll() {
        head = 0
        count = 0
    }
}

/// Guest output on its way to a peer that may be slow or absent (a socket client, a terminal
/// on a pty): what the peer takes at once goes straight out, the rest waits in a bounded queue
/// for the backend's I/O thread, and what neither takes is dropped and counted.
///
/// A value type with no locking of its own, kept inside the backend's `Mutex`. `send` writes
/// without blocking and returns what the peer took, or -1 with `errno` set.
struct PendingOutput {
    private var queue: ByteQueue
    /// Bytes lost so far: written with no peer, or more than the queue holds.
    private(set) var dropped: UInt64 = 0

    init(capacity: Int) {
        queue = ByteQueue(capacity: capacity)
    }

    /// True when nothing waits for the peer (the I/O thread need not poll for writability).
    var isEmpty: Bool { queue.isEmpty }

    /// Sends `bytes` to a present peer, trying at once only when nothing is queued (so bytes
    /// keep their order) and queueing the rest; drops them all when there is no peer. Returns
    /// true when the queue has just become non-empty: the I/O thread must be woken to flush it.
    mutating func write(_ bytes: UnsafeRawBufferPointer, peerPresent: Bool,
                        send: (UnsafeRawBufferPointer) -> Int) -> Bool {
        guard peerPresent else {
            dropped &+= UInt64(bytes.count)
            return false
        }
        let wasEmpty = queue.isEmpty
        var sent = 0
        if wasEmpty { sent = max(send(bytes), 0) }
        guard sent < bytes.count else { return false }
        dropped &+= UInt64(queue.append(UnsafeRawBufferPointer(rebasing: bytes[sent...])))
        return wasEmpty
    }

    /// Sends queued bytes while the peer takes them. Returns false when `send` failed with an
    /// error other than EAGAIN or EINTR (the peer is gone).
    mutating func flush(send: (UnsafeRawBufferPointer) -> Int) -> Bool {
        var healthy = true
        while !queue.isEmpty {
            var progressed = false
            queue.consumeContiguous { run in
                let n = send(run)
                if n < 0, errno != EAGAIN, errno != EINTR { healthy = false }
                progressed = n > 0
                return max(n, 0)
            }
            if !progressed { break }
        }
        return healthy
    }

    /// Forgets what is queued (the peer left, or a new one came: it starts with fresh output).
    mutating func removeAll() {
        queue.removeAll()
    }
}
