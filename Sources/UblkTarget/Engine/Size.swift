// Sizes as people write them: 512, 4K, 250G, 1.5T (binary units K M G T P E,
// B or iB optional, case-insensitive).
//
// Contract: `parse` returns nil for anything else — signs, hex, exponents,
// inf/nan, empty numbers — and for values above `Size.max` (Int64.max), so a
// parsed size always converts to Int and off_t and `size + 1` never overflows.
import FoundationEssentials

public enum Size {
    /// The largest size `parse` accepts: 8 EiB - 1 (off_t's range).
    public static let max = UInt64(Int64.max)

    public static func parse(_ text: String) -> UInt64? {
        var s = text.trimmed.uppercased()
        if s.hasSuffix("IB") { s.removeLast(2) } else if s.hasSuffix("B") && s.count > 1 { s.removeLast() }
        var shift: UInt64 = 0
        let units = "KMGTPE"
        if let last = s.last, let i = units.firstIndex(of: last) {
            shift = UInt64(units.distance(from: units.startIndex, to: i) + 1) * 10
            s.removeLast()
        }
        // Digits, with at most one '.' and a digit on some side of it: no sign, exponent, hex or inf.
        let parts = s.split(separator: ".", omittingEmptySubsequences: false)
        guard !s.isEmpty, parts.count <= 2, s != ".",
              s.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2E }) else { return nil }
        let unit = UInt64(1) << shift
        if parts.count == 1 {
            guard let whole = UInt64(s) else { return nil }
            let (v, overflow) = whole.multipliedReportingOverflow(by: unit)
            return overflow || v > max ? nil : v
        }
        // A fraction: whole part exactly, the fraction's bytes rounded.
        let wholeText = parts[0].isEmpty ? "0" : String(parts[0])
        guard let whole = UInt64(wholeText), let frac = Double("0." + (parts[1].isEmpty ? "0" : parts[1])) else { return nil }
        let (w, overflow) = whole.multipliedReportingOverflow(by: unit)
        guard !overflow, w <= max else { return nil }
        let extra = (frac * Double(unit)).rounded()
        guard extra.isFinite, extra < 9.2e18 else { return nil }
        let (v, o2) = w.addingReportingOverflow(UInt64(extra))
        return o2 || v > max ? nil : v
    }

    public static func format(_ bytes: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
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
