#if SANITIZER_VISIBLE_LOCKS
import Machine

/// In sanitizer builds, this module's locks are ones ThreadSanitizer can see (see
/// `Machine.SanitizerVisibleMutex`); normal builds use the standard library's `Mutex`.
typealias Mutex<Value> = SanitizerVisibleMutex<Value>
#endif
