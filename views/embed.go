// Package views holds the dashboard's HTML templates, embedded in the
// binary. Names are relative to this directory ("layouts/base.html",
// "dashboard/overview.html"), so the template engine sees "layouts/base"
// and "dashboard/overview" without any prefix to strip.
//
// html/v2 parses every file into one template namespace: pages never
// {{define}} blocks, they are embedded into layouts/base with {{embed}};
// shared pieces live in partials/ and are named by their path.
package views

import "embed"

// FS holds every template.
//
//go:embed layouts/*.html partials/*.html dashboard/*.html
var FS embed.FS
