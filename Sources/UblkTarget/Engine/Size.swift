// Sizes as people write them: 512, 4K, 250G, 1.5T (binary units, B optional).
import FoundationEssentials

public enum Size {
    public static func parse(_ text: String) -> UInt64? {
        var s = text.trimmed.uppercased()
        if s.hasSuffix("IB") { s.removeLast(2) } else if s.hasSuffix("B") && s.count > 1 { s.removeLast() }
        var shift: UInt64 = 0
        if let last = s.last, let i = "KMGTP".firstIndex(of: last) {
            shift = UInt64("KMGTP".distance(from: "KMGTP".startIndex, to: i) + 1) * 10
            s.removeLast()
        }
        guard !s.isEmpty else { return nil }
        if let whole = UInt64(s) {
            let (v, overflow) = whole.multipliedReportingOverflow(by: 1 << shift)
            return overflow ? nil : v
        }
        guard let d = Double(s), d >= 0, d.isFinite else { return nil }
        let v = d * Double(UInt64(1) << shift)
        guard v < 1.8e19 else { return nil }
        return UInt64(v.rounded())
    }

    public static func format(_ bytes: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
        var v = Double(bytes), i = 0
        while v >= 1024 && i < units.count - 1 { v /= 1024; i += 1 }
        if i == 0 { return "\(bytes) B" }
        let tenths = Int((v * 10).rounded())
        return "\(tenths / 10).\(tenths % 10) \(units[i])"
    }
}

extension StringProtocol {
    /// Without leading and trailing whitespace (FoundationEssentials has no trimmingCharacters).
    public var trimmed: String {
        String(drop(while: \.isWhitespace).reversed().drop(while: \.isWhitespace).reversed())
    }
}
