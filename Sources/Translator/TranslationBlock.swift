/// A translation block: a run of pre-decoded ops that starts at one guest physical address,
/// ends at a control-flow or system instruction or at the page end, and is executed as a unit.
///
/// Blocks live in a bump-allocated pool and are never moved; an index stays meaningful until
/// the next full flush, so a stale index is detected with `valid` and the identity fields.
struct TranslationBlock {
    /// Guest physical address of the first instruction.
    var physicalPC: UInt64 = 0
    /// Index of the first op in the op arena.
    var opStart: Int32 = 0
    var opCount: Int32 = 0
    /// Bytes of guest code covered.
    var byteLength: Int32 = 0
    /// Privilege level the block was fetched at (fetch permissions differ per level).
    var privilege: UInt8 = 0
    var valid: Bool = false
    /// Chained successors: [0] the taken branch or jump target, [1] the fall-through.
    var chainTB: (Int32, Int32) = (-1, -1)
    /// Virtual PCs the chained successors were linked for.
    var chainPC: (UInt64, UInt64) = (0, 0)
    /// MMU epoch when the chains were made; a different epoch means they are stale.
    var chainEpoch: UInt32 = 0
    /// Physical page of an instruction that straddles into the next page, or `.max`.
    var secondPage: UInt64 = .max
    /// Offset of the block's compiled code in the hart's code cache (JIT engine only), or -1.
    var jitCode: Int32 = -1
    /// Offsets of the patchable chain sites for slots 0 and 1 in the code cache, or -1.
    var jitSites: (Int32, Int32) = (-1, -1)
    /// For a chain site without a PC check (its target lies in the block's own page): the
    /// target's offset in that page, which only a block at that physical address may be linked
    /// to; -1 for a site that checks the PC.
    var jitSamePageTargets: (Int32, Int32) = (-1, -1)
}
