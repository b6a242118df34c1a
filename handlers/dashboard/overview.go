package dashboard

import (
	"cmp"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/openai-idempotent-proxy/proxy/models"
)

// statsWindow is one of the overview's time windows.
type statsWindow struct {
	Name  string        // the ?window= value
	Label string        // shown on its tab
	Span  time.Duration // how far back it reaches
	Step  time.Duration // one bar; whole hours let the roll-ups use hour rows
	// axis returns the x-axis label of the bar starting at t, or "".
	axis    func(t time.Time) string
	tooltip string // time layout of a bar in its tooltip
}

var statsWindows = []statsWindow{
	{Name: "1h", Label: "Last hour", Span: time.Hour, Step: time.Minute, tooltip: "15:04",
		axis: func(t time.Time) string { return labelIf(t.Minute()%10 == 0, t, "15:04") }},
	{Name: "24h", Label: "Last 24 hours", Span: 24 * time.Hour, Step: time.Hour, tooltip: "Jan 2 15:04",
		axis: func(t time.Time) string { return labelIf(t.Hour()%3 == 0, t, "15:04") }},
	{Name: "7d", Label: "Last 7 days", Span: 7 * 24 * time.Hour, Step: 6 * time.Hour, tooltip: "Mon Jan 2 15:04",
		axis: func(t time.Time) string { return labelIf(t.Hour() == 0, t, "Mon 2") }},
}

func labelIf(ok bool, t time.Time, layout string) string {
	if !ok {
		return ""
	}
	return t.Format(layout)
}

// refreshChoices are the offered auto-refresh periods, in seconds.
var refreshChoices = []int{0, 10, 30, 60}

// overviewPage is the data of dashboard/overview.
type overviewPage struct {
	layout
	Windows    []statsWindow
	Window     statsWindow
	Refreshes  []int
	From, To   time.Time
	LoadFailed bool // a query failed; some numbers are missing
	Totals     models.Totals
	Requests   stackedChart
	Tokens     stackedChart
	Spend      stackedChart
	Tops       []topTable // Top models, then Top clients
	SpendTops  []topTable // the same by spend
	// Unpriced are the models with requests but no price in the table:
	// their cost counts as 0, so the spend shown is incomplete.
	Unpriced []models.TopEntry
}

// topRow is one line of a top-N table.
// topTable is one top-N table of the overview (partials/toplist).
type topTable struct {
	ID, Title, Column string
	Filter            string // the request log filter a name links to
	BySpend           bool   // ranked and shared by spend, not requests
	Rows              []topRow
}

type topRow struct {
	Name     string
	Requests int64
	Tokens   int64
	Spend    int64   // micro-dollars
	Share    float64 // of all requests (or spend) in the window, 0..100
}

// Overview shows traffic, errors, latency, tokens, idempotency replays and
// conflicts, and the busiest models and clients (GET /dashboard).
func (h *Handler) Overview(c *fiber.Ctx) error {
	win := statsWindows[1]
	for _, w := range statsWindows {
		if c.Query("window") == w.Name {
			win = w
		}
	}
	p := overviewPage{layout: h.page(c, "Overview", "overview"), Windows: statsWindows, Window: win, Refreshes: refreshChoices}
	if r, err := strconv.Atoi(c.Query("refresh")); err == nil {
		for _, choice := range refreshChoices {
			if r == choice {
				p.Refresh = r
			}
		}
	}
	ctx := c.UserContext() // bounded by withQueryTimeout
	now := h.cfg.Now().UTC()
	p.To = now
	p.From = now.Add(-win.Span).Truncate(win.Step)

	var points []models.TrafficPoint
	if err := h.cfg.DB.Ping(ctx); err != nil {
		// The page still renders, empty, under a banner: an operator
		// opening the dashboard during an outage must learn why.
		h.cfg.Logger.Warn("dashboard: database unreachable", "error", err.Error())
		p.DBDown = true
	} else {
		// The four queries read only request_rollups and are independent.
		var (
			wg   sync.WaitGroup
			mu   sync.Mutex
			errs []error
		)
		run := func(f func() error) {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := f(); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}()
		}
		var topModels, clients []models.TopEntry
		run(func() (err error) { points, err = h.cfg.Stats.Traffic(ctx, p.From, now, win.Step); return })
		run(func() (err error) { p.Totals, err = h.cfg.Stats.Totals(ctx, p.From, now); return })
		// 100 rows: the top 8 by requests and by spend, and every model
		// without a price, from one query each.
		run(func() (err error) { topModels, err = h.cfg.Stats.TopModels(ctx, p.From, now, 100); return })
		run(func() (err error) { clients, err = h.cfg.Stats.TopClients(ctx, p.From, now, 100); return })
		wg.Wait()
		for _, err := range errs {
			h.cfg.Logger.Error("dashboard: overview query failed", "error", err.Error())
			p.LoadFailed = true
		}
		p.Tops = []topTable{
			{ID: "models", Title: "Top models", Column: "Model", Filter: "model", Rows: topRows(topModels[:min(8, len(topModels))], p.Totals.Requests)},
			{ID: "clients", Title: "Top clients", Column: "Client", Filter: "client", Rows: topRows(clients[:min(8, len(clients))], p.Totals.Requests)},
		}
		p.SpendTops = []topTable{
			{ID: "spend-models", Title: "Top models by spend", Column: "Model", Filter: "model", BySpend: true, Rows: spendRows(topModels, p.Totals.CostMicros)},
			{ID: "spend-clients", Title: "Top clients by spend", Column: "Client", Filter: "client", BySpend: true, Rows: spendRows(clients, p.Totals.CostMicros)},
		}
		if h.cfg.Prices != nil {
			for _, m := range topModels {
				if _, ok := h.cfg.Prices.Lookup(m.Name); m.Name != "" && !ok {
					p.Unpriced = append(p.Unpriced, m)
				}
			}
		}
	}
	if len(points) == 0 {
		// Empty axes of the right width, so the charts keep their shape.
		for t := p.From; t.Before(now); t = t.Add(win.Step) {
			points = append(points, models.TrafficPoint{Time: t})
		}
	}
	p.Requests, p.Tokens = trafficCharts(points, win, p.Totals)
	p.Spend = spendChart(points, win, p.Totals)
	return render(c, http.StatusOK, "overview", p)
}

func topRows(entries []models.TopEntry, total int64) []topRow {
	rows := make([]topRow, 0, len(entries))
	for _, e := range entries {
		r := topRow{Name: e.Name, Requests: e.Requests, Tokens: e.Tokens}
		if total > 0 {
			r.Share = min(100, float64(e.Requests)*100/float64(total))
		}
		rows = append(rows, r)
	}
	return rows
}

// spendRows ranks entries by spend, the 8 that spent anything.
func spendRows(entries []models.TopEntry, total int64) []topRow {
	sorted := slices.Clone(entries)
	slices.SortStableFunc(sorted, func(a, b models.TopEntry) int { return cmp.Compare(b.CostMicros, a.CostMicros) })
	var rows []topRow
	for _, e := range sorted {
		if e.CostMicros <= 0 || len(rows) == 8 {
			break
		}
		r := topRow{Name: e.Name, Requests: e.Requests, Tokens: e.Tokens, Spend: e.CostMicros}
		if total > 0 {
			r.Share = min(100, float64(e.CostMicros)*100/float64(total))
		}
		rows = append(rows, r)
	}
	return rows
}

// spendChart is the spend over time, in USD.
func spendChart(points []models.TrafficPoint, win statsWindow, totals models.Totals) stackedChart {
	usd := chartSeries{Name: "spend", Class: "tprompt", Values: make([]float64, len(points))}
	labels, axis := make([]string, len(points)), make([]string, len(points))
	for i, pt := range points {
		labels[i] = pt.Time.Format(win.tooltip) + " UTC"
		axis[i] = win.axis(pt.Time)
		usd.Values[i] = float64(pt.CostMicros) / 1e6
	}
	return stackedChart{ID: "chart-spend", Title: "Spend over time in USD",
		Summary: fmt.Sprintf("%s spent in the %s, at the price table.", formatUSD(totals.CostMicros), lower(win.Label)),
		Unit:    "USD", Money: true, Labels: labels, Axis: axis, Series: []chartSeries{usd}}
}

// trafficCharts turns the traffic points into the two overview charts.
func trafficCharts(points []models.TrafficPoint, win statsWindow, totals models.Totals) (requests, tokens stackedChart) {
	n := len(points)
	labels, axis := make([]string, n), make([]string, n)
	series := func(name, class string) chartSeries {
		return chartSeries{Name: name, Class: class, Values: make([]float64, n)}
	}
	s2, s3, s4, s5, s0 := series("2xx", "s2xx"), series("3xx", "s3xx"), series("4xx", "s4xx"), series("5xx", "s5xx"), series("no status", "s0")
	prompt, completion := series("prompt", "tprompt"), series("completion", "tcompletion")
	var busiest int
	var reqs, toks int64
	for i, pt := range points {
		labels[i] = pt.Time.Format(win.tooltip) + " UTC"
		axis[i] = win.axis(pt.Time)
		s2.Values[i], s3.Values[i] = float64(pt.Status2xx), float64(pt.Status3xx)
		s4.Values[i], s5.Values[i], s0.Values[i] = float64(pt.Status4xx), float64(pt.Status5xx), float64(pt.StatusOther)
		prompt.Values[i], completion.Values[i] = float64(pt.PromptTokens), float64(pt.CompletionTokens)
		if pt.Requests > points[busiest].Requests {
			busiest = i
		}
		reqs += pt.Requests
		toks += pt.PromptTokens + pt.CompletionTokens
	}
	summary := fmt.Sprintf("%d requests in the %s, %d of them 5xx.", reqs, lower(win.Label), sumInt(s5.Values))
	if n > 0 && points[busiest].Requests > 0 {
		summary += fmt.Sprintf(" Busiest: %s with %d requests.", labels[busiest], points[busiest].Requests)
	}
	requests = stackedChart{ID: "chart-requests", Title: "Requests over time by status class", Summary: summary,
		Unit: "requests", Labels: labels, Axis: axis, Series: []chartSeries{s2, s3, s4, s5, s0}}
	tokens = stackedChart{ID: "chart-tokens", Title: "Tokens over time, prompt and completion",
		Summary: fmt.Sprintf("%d prompt and completion tokens in the %s (%d prompt, %d completion).",
			toks, lower(win.Label), totals.PromptTokens, totals.CompletionTokens),
		Unit: "tokens", Labels: labels, Axis: axis, Series: []chartSeries{prompt, completion}}
	return requests, tokens
}

func sumInt(vs []float64) int64 {
	var s int64
	for _, v := range vs {
		s += int64(v)
	}
	return s
}

func lower(s string) string {
	if s == "" {
		return s
	}
	return string(s[0]|0x20) + s[1:]
}
