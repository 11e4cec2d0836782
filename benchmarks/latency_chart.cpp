#include "latency_chart.h"

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <iterator>

#include <fmt/format.h>

#include "token_count.h"

namespace m1::bench {
namespace {

constexpr double kPlotWidth = 380, kPlotHeight = 300;
constexpr double kLeft = 80, kRight = 30, kTop = 90, kBottom = 60;
constexpr double kPanelWidth = kLeft + kPlotWidth + kRight;
constexpr int kMaxContextTicks = 9;
constexpr double kContextMargin = 0.3;  // in octaves
const char* const kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"};

struct Point {
  double context, ms;
};

struct Series {
  std::string label;
  std::vector<Point> prefill, decode;
};

struct Tick {
  double value;
  std::string label;
};

// A logarithmic axis: values in [10^lo, 10^hi] map linearly in log10 onto pixels [from, to].
struct LogAxis {
  double lo = 0, hi = 1, from = 0, to = 1;
  std::vector<Tick> ticks;
  double pixel(double value) const { return from + (std::log10(value) - lo) / (hi - lo) * (to - from); }
};

std::string escape_xml(const std::string& text) {
  std::string out;
  for (char c : text) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

// One series per variant, in order of first appearance; points a log axis cannot show are left out.
std::vector<Series> series_of(const std::vector<BenchResult>& results) {
  std::vector<Series> series;
  for (const BenchResult& r : results) {
    const std::string label = r.variant + (r.random_weights ? " (random weights)" : "");
    auto it = std::find_if(series.begin(), series.end(), [&](const Series& s) { return s.label == label; });
    if (it == series.end()) it = series.insert(series.end(), Series{label, {}, {}});
    const Summary s = summarize(r.measurement);
    const double context = double(r.measurement.context);
    if (context <= 0) continue;
    if (s.prefill_ms > 0) it->prefill.push_back({context, s.prefill_ms});
    if (s.decode_ms_per_token > 0) it->decode.push_back({context, s.decode_ms_per_token});
  }
  for (Series& s : series) {
    auto by_context = [](const Point& a, const Point& b) { return a.context < b.context; };
    std::sort(s.prefill.begin(), s.prefill.end(), by_context);
    std::sort(s.decode.begin(), s.decode.end(), by_context);
  }
  return series;
}

// Context axis: a little wider than the data, so end points sit inside the frame; ticks on the
// powers of two, labelled like the command line (4k, 1m).
LogAxis context_axis(double min, double max) {
  const double lo = std::log2(min) - kContextMargin, hi = std::log2(max) + kContextMargin;
  const int first = int(std::ceil(lo)), last = int(std::floor(hi));
  const int step = std::max(1, (last - first + kMaxContextTicks) / kMaxContextTicks);
  LogAxis axis{lo * std::log10(2.0), hi * std::log10(2.0), kLeft, kLeft + kPlotWidth, {}};
  for (int e = first; e <= last; e += step) axis.ticks.push_back({std::ldexp(1.0, e), format_token_count(int64_t(1) << e)});
  return axis;
}

// Latency axis: whole decades around the data, with 2x and 5x ticks when it spans few of them.
LogAxis latency_axis(double min, double max) {
  int lo = int(std::floor(std::log10(min))), hi = int(std::ceil(std::log10(max)));
  if (lo == hi) ++hi;
  LogAxis axis{double(lo), double(hi), kTop + kPlotHeight, kTop, {}};
  for (int e = lo; e <= hi; ++e)
    for (double m : {1.0, 2.0, 5.0}) {
      const double value = m * std::pow(10.0, e);
      if ((m == 1.0 || hi - lo <= 2) && value <= std::pow(10.0, hi)) axis.ticks.push_back({value, fmt::format("{:g}", value)});
    }
  return axis;
}

using PointsOf = const std::vector<Point>& (*)(const Series&);
const std::vector<Point>& prefill_points(const Series& s) { return s.prefill; }
const std::vector<Point>& decode_points(const Series& s) { return s.decode; }

struct Panel {
  const char* y_title;
  PointsOf points;
  double shift;  // x offset of the panel in the figure
};
const Panel kPanels[] = {{"prefill latency (ms)", prefill_points, 0}, {"decode (ms per token)", decode_points, kPanelWidth}};

// The smallest and largest `field` of the points `which` picks from every series, or [1, 10] when
// there are none.
std::pair<double, double> extent(const std::vector<Series>& series, std::initializer_list<PointsOf> which,
                                 double Point::*field) {
  double min = INFINITY, max = 0;
  for (const Series& s : series)
    for (PointsOf points : which)
      for (const Point& p : points(s)) min = std::min(min, p.*field), max = std::max(max, p.*field);
  return max > 0 ? std::pair{min, max} : std::pair{1.0, 10.0};
}

void draw_axes(std::string& svg, const LogAxis& x, const LogAxis& y, double shift, const std::string& y_title) {
  auto out = std::back_inserter(svg);
  fmt::format_to(out, "<g transform=\"translate({},0)\" font-size=\"12\" fill=\"#333\">\n", shift);
  for (const Tick& t : x.ticks)
    fmt::format_to(out, "<line x1=\"{0:.1f}\" y1=\"{1}\" x2=\"{0:.1f}\" y2=\"{2}\" stroke=\"#ddd\"/>"
                   "<text x=\"{0:.1f}\" y=\"{3}\" text-anchor=\"middle\">{4}</text>\n",
                   x.pixel(t.value), kTop, kTop + kPlotHeight, kTop + kPlotHeight + 18, escape_xml(t.label));
  for (const Tick& t : y.ticks)
    fmt::format_to(out, "<line x1=\"{1}\" y1=\"{0:.1f}\" x2=\"{2}\" y2=\"{0:.1f}\" stroke=\"#ddd\"/>"
                   "<text x=\"{3}\" y=\"{0:.1f}\" text-anchor=\"end\" dominant-baseline=\"middle\">{4}</text>\n",
                   y.pixel(t.value), kLeft, kLeft + kPlotWidth, kLeft - 6, escape_xml(t.label));
  fmt::format_to(out, "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#333\"/>\n", kLeft, kTop,
                 kPlotWidth, kPlotHeight);
  fmt::format_to(out, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">context (tokens)</text>\n", kLeft + kPlotWidth / 2,
                 kTop + kPlotHeight + 40);
  fmt::format_to(out, "<text transform=\"translate({},{}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n</g>\n", 20,
                 kTop + kPlotHeight / 2, escape_xml(y_title));
}

void draw_line(std::string& svg, const std::vector<Point>& points, const LogAxis& x, const LogAxis& y, double shift,
               const char* color) {
  auto out = std::back_inserter(svg);
  fmt::format_to(out, "<g transform=\"translate({},0)\" stroke=\"{}\" fill=\"{}\">\n<polyline fill=\"none\" stroke-width=\"2\" points=\"",
                 shift, color, color);
  for (const Point& p : points) fmt::format_to(out, "{:.1f},{:.1f} ", x.pixel(p.context), y.pixel(p.ms));
  svg += "\"/>\n";
  for (const Point& p : points) fmt::format_to(out, "<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3.5\"/>\n", x.pixel(p.context), y.pixel(p.ms));
  svg += "</g>\n";
}

void draw_legend(std::string& svg, const std::vector<Series>& series) {
  auto out = std::back_inserter(svg);
  double x = kLeft;
  for (size_t i = 0; i < series.size(); ++i) {
    const char* color = kColors[i % std::size(kColors)];
    fmt::format_to(out, "<line x1=\"{0}\" y1=\"52\" x2=\"{1}\" y2=\"52\" stroke=\"{2}\" stroke-width=\"2\"/>"
                   "<circle cx=\"{3}\" cy=\"52\" r=\"3.5\" fill=\"{2}\"/>"
                   "<text x=\"{4}\" y=\"56\" font-size=\"13\">{5}</text>\n",
                   x, x + 24, color, x + 12, x + 30, escape_xml(series[i].label));
    x += 50 + 7.5 * double(series[i].label.size());
  }
}

}  // namespace

std::string latency_chart_svg(const std::vector<BenchResult>& results, const std::string& title) {
  const std::vector<Series> series = series_of(results);
  const auto [context_min, context_max] = extent(series, {prefill_points, decode_points}, &Point::context);
  const LogAxis x = context_axis(context_min, context_max);
  std::string svg;
  fmt::format_to(std::back_inserter(svg),
                 "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} {1}\" "
                 "font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
                 "<text x=\"{2}\" y=\"26\" font-size=\"15\" font-weight=\"bold\">{3}</text>\n",
                 2 * kPanelWidth, kTop + kPlotHeight + kBottom, kLeft, escape_xml(title));
  draw_legend(svg, series);
  for (const Panel& panel : kPanels) {
    // Each panel scales its own latencies; both share the context axis.
    const auto [ms_min, ms_max] = extent(series, {panel.points}, &Point::ms);
    const LogAxis y = latency_axis(ms_min, ms_max);
    draw_axes(svg, x, y, panel.shift, panel.y_title);
    for (size_t i = 0; i < series.size(); ++i)
      draw_line(svg, panel.points(series[i]), x, y, panel.shift, kColors[i % std::size(kColors)]);
  }
  svg += "</svg>\n";
  return svg;
}

}  // namespace m1::bench
