package models

import (
	_ "embed"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"regexp"
)

// pricesJSON is the embedded price table; its "source" and "date" say
// where and when the figures were taken.
//
//go:embed prices.json
var pricesJSON []byte

// Price is what a model costs, in USD per 1M tokens. Reasoning tokens are
// part of the output tokens and billed as output, as OpenAI does; cached
// input falls back to the input price where none is listed.
type Price struct {
	Input       float64 `json:"input"`
	CachedInput float64 `json:"cached_input,omitempty"`
	Output      float64 `json:"output"`
	AudioInput  float64 `json:"audio_input,omitempty"`
	AudioOutput float64 `json:"audio_output,omitempty"`
}

// Prices is a price table: the embedded one, optionally overridden by a
// file (PRICE_FILE).
type Prices struct {
	Source string           `json:"source"`
	Date   string           `json:"date"`
	Models map[string]Price `json:"models"`
}

// DefaultPrices returns the embedded table.
func DefaultPrices() *Prices {
	p, err := parsePrices(pricesJSON)
	if err != nil {
		panic("models: embedded prices.json: " + err.Error()) // a build defect, caught by the tests
	}
	return p
}

// LoadPrices returns the embedded table with the models in file (the same
// JSON shape) added or replacing theirs; an empty path returns the
// embedded table. The file's source and date replace the embedded ones.
func LoadPrices(path string) (*Prices, error) {
	p := DefaultPrices()
	if path == "" {
		return p, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("cannot read: %w", err)
	}
	over, err := parsePrices(b)
	if err != nil {
		return nil, err
	}
	for name, price := range over.Models {
		p.Models[name] = price
	}
	p.Source, p.Date = over.Source, over.Date
	return p, nil
}

func parsePrices(b []byte) (*Prices, error) {
	var p Prices
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("not a price table: %w", err)
	}
	for name, pr := range p.Models {
		for _, v := range []float64{pr.Input, pr.CachedInput, pr.Output, pr.AudioInput, pr.AudioOutput} {
			if v < 0 || math.IsNaN(v) || math.IsInf(v, 0) || v > 1e6 {
				return nil, fmt.Errorf("model %q: prices must be between 0 and 1e6 USD per 1M tokens", name)
			}
		}
	}
	if p.Models == nil {
		p.Models = map[string]Price{}
	}
	return &p, nil
}

// snapshotSuffix matches a dated model snapshot: gpt-4o-2024-08-06, o1-0912.
var snapshotSuffix = regexp.MustCompile(`-(\d{4}-\d{2}-\d{2}|\d{4})$`)

// Lookup finds a model's price: by its name, or as a dated snapshot of a
// listed model. ok is false for a model the table does not know.
func (p *Prices) Lookup(model string) (Price, bool) {
	if pr, ok := p.Models[model]; ok {
		return pr, true
	}
	if base := snapshotSuffix.ReplaceAllString(model, ""); base != model {
		pr, ok := p.Models[base]
		return pr, ok
	}
	return Price{}, false
}

// TokenUsage is what a response reports, in the terms prices are quoted.
type TokenUsage struct {
	Input       int64 // all input tokens, cached and audio included
	CachedInput int64 // of Input, read from the prompt cache
	AudioInput  int64 // of Input, audio
	Output      int64 // all output tokens, reasoning and audio included
	AudioOutput int64 // of Output, audio
}

// CostMicros is the cost of usage at price in micro-dollars, rounded to
// the nearest; unknown models cost 0.
func (p *Prices) CostMicros(model string, u TokenUsage) int64 {
	pr, ok := p.Lookup(model)
	if !ok {
		return 0
	}
	return pr.CostMicros(u)
}

// CostMicros is the cost of usage at this price, in micro-dollars.
func (pr Price) CostMicros(u TokenUsage) int64 {
	cachedPrice := pr.CachedInput
	if cachedPrice == 0 {
		cachedPrice = pr.Input
	}
	audioIn, audioOut := pr.AudioInput, pr.AudioOutput
	if audioIn == 0 {
		audioIn = pr.Input
	}
	if audioOut == 0 {
		audioOut = pr.Output
	}
	plainIn := max(0, u.Input-u.CachedInput-u.AudioInput)
	plainOut := max(0, u.Output-u.AudioOutput)
	// USD per 1M tokens is micro-dollars per token.
	usd := float64(plainIn)*pr.Input + float64(u.CachedInput)*cachedPrice + float64(u.AudioInput)*audioIn +
		float64(plainOut)*pr.Output + float64(u.AudioOutput)*audioOut
	return int64(math.Round(usd))
}
