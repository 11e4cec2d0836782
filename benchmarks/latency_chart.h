#pragma once
// m1-bench's chart, drawn without any plotting library: prefill latency and decode time per token
// against context length, log-log, one line per variant, as a self-contained SVG document.

#include <string>
#include <vector>

#include "bench_report.h"

namespace m1::bench {

std::string latency_chart_svg(const std::vector<BenchResult>& results, const std::string& title);

}  // namespace m1::bench
