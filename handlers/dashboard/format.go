package dashboard

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"html/template"
	"io/fs"
	"math"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/dustin/go-humanize"

	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/static"
)

// Funcs are the template functions the dashboard's views use. The
// app registers them on the engine before Load.
func Funcs() template.FuncMap {
	return template.FuncMap{
		"num":         func(n int64) string { return humanize.Comma(n) },
		"usd":         formatUSD,
		"bytes":       formatBytes,
		"ms":          formatMs,
		"latency":     formatLatency,
		"pct":         formatPct,
		"utc":         formatTime,
		"statusClass": statusClassName,
		"float":       func(n int64) float64 { return float64(n) },
		"short":       truncateRunes,
		"list":        func(xs ...string) []string { return xs },
		"ttl":         formatTTL,
		"asset":       assetURL,
		"dash":        func() string { return Prefix }, // every dashboard URL starts here
		"words":       func(s string) string { return strings.ReplaceAll(s, "_", " ") },
	}
}

// assetURL is the address of a static file, versioned by the content of
// all of them so browsers may cache them and still see a new release.
func assetURL(name string) string {
	return Prefix + "/static/" + name + "?v=" + assetVersion()
}

var assetVersion = sync.OnceValue(func() string {
	h := sha256.New()
	_ = fs.WalkDir(static.FS, ".", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := fs.ReadFile(static.FS, path)
		h.Write([]byte(path))
		h.Write(b)
		return err
	})
	return hex.EncodeToString(h.Sum(nil)[:6])
})

// formatTTL shows a configured duration briefly: "24h", "30m", "7d".
func formatTTL(d time.Duration) string {
	switch {
	case d <= 0:
		return "—"
	case d >= 48*time.Hour && d%(24*time.Hour) == 0:
		return strconv.Itoa(int(d/(24*time.Hour))) + "d"
	case d%time.Hour == 0:
		return strconv.Itoa(int(d/time.Hour)) + "h"
	case d%time.Minute == 0:
		return strconv.Itoa(int(d/time.Minute)) + "m"
	}
	return d.String()
}

// timeLayout is how the dashboard shows instants: UTC, to the second.
const timeLayout = "2006-01-02 15:04:05"

func formatTime(t time.Time) string {
	if t.IsZero() {
		return "—"
	}
	return t.UTC().Format(timeLayout)
}

func formatBytes(n int64) string {
	if n < 1024 {
		return strconv.FormatInt(n, 10) + " B"
	}
	return humanize.IBytes(uint64(n))
}

// formatMs shows a latency: whole milliseconds below a second, then seconds.
// Durations are logged in whole milliseconds, cut down, so 0 means "under
// a millisecond".
func formatMs(ms float64) string {
	switch {
	case ms < 1:
		return "< 1 ms"
	case ms < 1000:
		return fmt.Sprintf("%.0f ms", ms)
	}
	return fmt.Sprintf("%.2f s", ms/1000)
}

// formatLatency shows the histogram bucket a latency quantile is in, and
// no more: "< 1 ms", "2 ms", "10–25 ms", "500 ms–1 s", "> 120 s".
func formatLatency(r models.LatencyRange) string {
	switch {
	case !r.Known:
		return "—"
	case r.AboveMs < 0 && r.UpToMs == 0:
		return "< 1 ms"
	case r.AboveMs < 0:
		return "≤ " + formatBound(r.UpToMs, true)
	case r.UpToMs < 0:
		return "> " + formatBound(r.AboveMs, true)
	case r.UpToMs-r.AboveMs == 1:
		return formatBound(r.UpToMs, true)
	}
	// One unit for both ends when they share it: "10–25 ms", "1–2.5 s".
	sameUnit := (r.AboveMs < 1000) == (r.UpToMs < 1000)
	return formatBound(r.AboveMs, !sameUnit) + "–" + formatBound(r.UpToMs, true)
}

// formatBound shows a bucket bound in ms below a second, else in seconds.
func formatBound(ms int64, unit bool) string {
	n, u := strconv.FormatInt(ms, 10), " ms"
	if ms >= 1000 {
		n, u = strconv.FormatFloat(float64(ms)/1000, 'f', -1, 64), " s"
	}
	if !unit {
		return n
	}
	return n + u
}

// formatPct shows a 0..1 rate as a percentage, with more digits when small.
func formatPct(r float64) string {
	switch p := r * 100; {
	case p == 0:
		return "0%"
	case p < 1:
		return fmt.Sprintf("%.2f%%", p)
	default:
		return fmt.Sprintf("%.1f%%", p)
	}
}

// statusClassName names the CSS class of a status badge.
func statusClassName(status int) string {
	switch c := status / 100; c {
	case 2, 3, 4, 5:
		return "s" + strconv.Itoa(c) + "xx"
	}
	return "s0"
}

// formatLeft shows a remaining time to the minute ("23h 59m"), or to the
// second below a minute; zero or less is "expired".
func formatLeft(d time.Duration) string {
	switch {
	case d <= 0:
		return "expired"
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm %02ds", int(d.Minutes()), int(d.Seconds())%60)
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh %02dm", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%dd %02dh", int(d.Hours())/24, int(d.Hours())%24)
}

// formatAgo shows how long ago t was, coarsely.
func formatAgo(now, t time.Time) string {
	d := now.Sub(t)
	if d < 0 {
		d = 0
	}
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds ago", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm ago", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh %02dm ago", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%dd ago", int(d.Hours())/24)
}

// compact shows an axis number briefly: 950, 1.2k, 3.4M.
func compact(v float64) string {
	a := math.Abs(v)
	switch {
	case a >= 1e9:
		return trimZero(fmt.Sprintf("%.1f", v/1e9)) + "G"
	case a >= 1e6:
		return trimZero(fmt.Sprintf("%.1f", v/1e6)) + "M"
	case a >= 1e3:
		return trimZero(fmt.Sprintf("%.1f", v/1e3)) + "k"
	case a == math.Trunc(a):
		return strconv.FormatFloat(v, 'f', 0, 64)
	}
	return trimZero(fmt.Sprintf("%.2f", v))
}

func trimZero(s string) string {
	if strings.Contains(s, ".") {
		s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	}
	return s
}

// formatUSD shows micro-dollars as dollars: cents, or every digit under
// a cent in full so small spends do not read "$0.00".
func formatUSD(micros int64) string {
	usd := float64(micros) / 1e6
	if micros != 0 && usd < 0.01 && usd > -0.01 {
		return "$" + strconv.FormatFloat(usd, 'f', -1, 64)
	}
	return "$" + humanize.CommafWithDigits(math.Round(usd*100)/100, 2)
}
