#if SANITIZER_VISIBLE_LOCKS
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A lock with the interface the code uses of the standard library's `Mutex`, built on
/// `pthread_mutex_t`, which ThreadSanitizer intercepts. The standard library's `Mutex` locks
/// with futex operations inside the uninstrumented runtime, so ThreadSanitizer sees no
/// ordering between two critical sections and reports every state such a lock guards as a race.
///
/// Compiled only into sanitizer builds (`scripts/sanitize` passes
/// `-DSANITIZER_VISIBLE_LOCKS`), where each module's `Mutex` names this type (see the module's
/// `SanitizerLocks.swift`); normal builds use the standard library's `Mutex` unchanged.
public final class SanitizerVisibleMutex<Value>: @unchecked Sendable {  // unchecked: `value` is touched only with `mutex` held
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private var value: Value

    /// A lock guarding `initialValue`.
    public init(_ initialValue: sending Value) {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        value = initialValue
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// Runs `body` on the guarded value with the lock held.
    public func withLock<Result, E: Error>(_ body: (inout Value) throws(E) -> Result) throws(E) -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}

/// In sanitizer builds, this module's locks are ones ThreadSanitizer can see.
typealias Mutex<Value> = SanitizerVisibleMutex<Value>
#endif
