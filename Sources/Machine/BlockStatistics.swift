/// What a block device has done since it was created, QEMU's `BlockDeviceStats` subset:
/// completed requests and their bytes and time, by kind, and the ones that failed. A plain
/// value: the device keeps it (virtio-blk) and `query-blockstats` reports it.
public struct BlockIOStatistics: Sendable, Equatable {
    public var readBytes: UInt64 = 0
    public var writtenBytes: UInt64 = 0
    public var discardedBytes: UInt64 = 0
    public var readOperations: UInt64 = 0
    public var writeOperations: UInt64 = 0
    public var flushOperations: UInt64 = 0
    public var discardOperations: UInt64 = 0
    public var readTimeNanoseconds: UInt64 = 0
    public var writeTimeNanoseconds: UInt64 = 0
    public var flushTimeNanoseconds: UInt64 = 0
    public var discardTimeNanoseconds: UInt64 = 0
    public var failedReadOperations: UInt64 = 0
    public var failedWriteOperations: UInt64 = 0
    public var failedFlushOperations: UInt64 = 0
    public var failedDiscardOperations: UInt64 = 0
    /// The end of the furthest write, in bytes (QEMU's `wr_highest_offset`).
    public var highestWriteOffset: UInt64 = 0
    /// When the last request completed (monotonic nanoseconds), for `idle_time_ns`.
    public var lastCompletion: UInt64?
    public init() {}
}

