package dashboard

import (
	"fmt"
	"html/template"
	"math"
	"strings"

	"github.com/dustin/go-humanize"
)

// The overview's charts are SVG drawn here, on the server: no JavaScript,
// no chart library, nothing fetched from elsewhere, and they print.

// chartSeries is one layer of a stacked chart.
type chartSeries struct {
	Name   string
	Class  string // CSS class giving the layer its colour
	Values []float64
}

// stackedChart is a stacked bar chart over time.
type stackedChart struct {
	ID      string   // unique within the page; prefixes the ARIA ids
	Title   string   // the accessible name
	Summary string   // the accessible description, in words
	Unit    string   // what the bars count, for tooltips ("requests")
	Money   bool     // the values are US dollars: ticks from a cent, tooltips exact
	Labels  []string // one per bar, for tooltips
	Axis    []string // one per bar: the x-axis label, or "" for none
	Series  []chartSeries
}

// Chart geometry, in viewBox units; the SVG scales to its container.
const (
	chartW, chartH = 760.0, 240.0
	padLeft        = 52.0
	padRight       = 10.0
	padTop         = 12.0
	padBottom      = 30.0
	plotW          = chartW - padLeft - padRight
	plotH          = chartH - padTop - padBottom
)

// totals returns the stacked height of each bar.
func (c stackedChart) totals() []float64 {
	out := make([]float64, len(c.Labels))
	for _, s := range c.Series {
		for i, v := range s.Values {
			if i < len(out) {
				out[i] += v
			}
		}
	}
	return out
}

// SVG draws the chart: a y axis with round ticks and grid lines, an x axis
// with at most about eight labels, and one stacked bar per step whose
// <title> tells its numbers on hover and to assistive technology.
func (c stackedChart) SVG() template.HTML {
	esc := template.HTMLEscapeString
	totals := c.totals()
	peak := 0.0
	for _, t := range totals {
		peak = max(peak, t)
	}
	minStep := 1.0 // the charts count whole things
	if c.Money {
		minStep = 0.01
	}
	top, step := niceScale(peak, minStep)
	var b strings.Builder
	fmt.Fprintf(&b, `<svg class="chart" viewBox="0 0 %g %g" role="img" aria-labelledby="%s-t %s-d" preserveAspectRatio="xMidYMid meet">`,
		chartW, chartH, esc(c.ID), esc(c.ID))
	fmt.Fprintf(&b, `<title id="%s-t">%s</title><desc id="%s-d">%s</desc>`, esc(c.ID), esc(c.Title), esc(c.ID), esc(c.Summary))

	// Grid and y axis.
	b.WriteString(`<g class="axis y" aria-hidden="true">`)
	for v := 0.0; v <= top+step/2; v += step {
		y := yPos(v, top)
		fmt.Fprintf(&b, `<line class="grid" x1="%g" x2="%g" y1="%.1f" y2="%.1f"/>`, padLeft, chartW-padRight, y, y)
		fmt.Fprintf(&b, `<text x="%g" y="%.1f" text-anchor="end" dominant-baseline="middle">%s</text>`, padLeft-8, y, esc(c.tick(v)))
	}
	b.WriteString(`</g>`)

	n := len(c.Labels)
	if n == 0 {
		n = 1
	}
	slot := plotW / float64(n)
	barW := max(1, slot*0.76)

	// Bars, one group per step, the series stacked bottom-up.
	b.WriteString(`<g class="bars">`)
	for i, label := range c.Labels {
		x := padLeft + float64(i)*slot
		b.WriteString(`<g class="bar">`)
		fmt.Fprintf(&b, `<title>%s</title>`, esc(c.tooltip(i, label, totals[i])))
		fmt.Fprintf(&b, `<rect class="hit" x="%.2f" y="%g" width="%.2f" height="%g"/>`, x, padTop, slot, plotH)
		base := 0.0
		for _, s := range c.Series {
			if i >= len(s.Values) || s.Values[i] <= 0 {
				continue
			}
			y0, y1 := yPos(base, top), yPos(base+s.Values[i], top)
			h := max(y0-y1, 0.8) // a single request stays visible
			fmt.Fprintf(&b, `<rect class="%s" x="%.2f" y="%.2f" width="%.2f" height="%.2f"/>`,
				esc(s.Class), x+(slot-barW)/2, y0-h, barW, h)
			base += s.Values[i]
		}
		b.WriteString(`</g>`)
	}
	b.WriteString(`</g>`)

	// X axis: baseline, ticks and the labels that are set.
	b.WriteString(`<g class="axis x" aria-hidden="true">`)
	fmt.Fprintf(&b, `<line class="base" x1="%g" x2="%g" y1="%g" y2="%g"/>`, padLeft, chartW-padRight, padTop+plotH, padTop+plotH)
	for i, label := range c.Axis {
		if label == "" {
			continue
		}
		cx := padLeft + (float64(i)+0.5)*slot
		fmt.Fprintf(&b, `<line class="tick" x1="%.2f" x2="%.2f" y1="%g" y2="%g"/>`, cx, cx, padTop+plotH, padTop+plotH+4)
		fmt.Fprintf(&b, `<text x="%.2f" y="%g" text-anchor="middle">%s</text>`, cx, padTop+plotH+18, esc(label))
	}
	b.WriteString(`</g>`)
	if peak == 0 {
		fmt.Fprintf(&b, `<text class="empty" x="%g" y="%g" text-anchor="middle">No %s in this window</text>`,
			padLeft+plotW/2, padTop+plotH/2, esc(c.Unit))
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String()) //nolint:gosec // every interpolated text is escaped above
}

// tooltip reads one bar: "14:00 — 120 requests: 2xx 110, 5xx 10".
func (c stackedChart) tooltip(i int, label string, total float64) string {
	var parts []string
	for _, s := range c.Series {
		if i < len(s.Values) && s.Values[i] > 0 {
			parts = append(parts, s.Name+" "+c.amount(s.Values[i]))
		}
	}
	t := label + " — " + c.amount(total)
	if !c.Money {
		t += " " + c.Unit
	}
	if len(parts) > 0 {
		t += ": " + strings.Join(parts, ", ")
	}
	return t
}

// tick labels a y-axis value: 1.5k, or $0.025 for money.
func (c stackedChart) tick(v float64) string {
	switch {
	case !c.Money:
		return compact(v)
	case v < 1:
		return "$" + trimZero(fmt.Sprintf("%.3f", v))
	}
	return "$" + compact(v)
}

// amount tells a bar's value exactly: 1,234, or $0.000006 for money.
func (c stackedChart) amount(v float64) string {
	if c.Money {
		return formatUSD(int64(math.Round(v * 1e6)))
	}
	return fmtCount(v)
}

func fmtCount(v float64) string {
	if v == math.Trunc(v) && math.Abs(v) < 1e15 {
		return humanize.Comma(int64(v))
	}
	return fmt.Sprintf("%.1f", v)
}

// yPos maps a value to its y coordinate.
func yPos(v, top float64) float64 {
	return padTop + plotH - v/top*plotH
}

// niceScale picks the axis top and tick step for values up to peak: about
// four steps of 1, 2, 2.5 or 5 times a power of ten, never below minStep.
func niceScale(peak, minStep float64) (top, step float64) {
	if peak <= 0 {
		return 4 * minStep, minStep
	}
	raw := peak / 4
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	step = 10 * mag
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if m*mag >= raw {
			step = m * mag
			break
		}
	}
	step = max(step, minStep)
	return math.Ceil(peak/step) * step, step
}
