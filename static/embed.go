// Package static holds the dashboard's stylesheet and icon, embedded in the
// binary and served under /dashboard/static/. Nothing is loaded from a CDN.
package static

import "embed"

// FS holds the assets, named relative to this directory ("dashboard.css").
//
//go:embed *.css *.svg
var FS embed.FS
