// Probe for the ctest isa_objects_share_no_inline_code_probe: an inline function emitted out of
// line, which the check must report.
namespace int4kit {
__attribute__((noinline)) inline int twice(int v) { return 2 * v; }
}  // namespace int4kit
int int4kit_isa_probe(int v) { return int4kit::twice(v); }
