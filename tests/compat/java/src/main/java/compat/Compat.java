package compat;

import java.io.ByteArrayInputStream;
import java.io.InputStream;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.KeyFactory;
import java.security.KeyStore;
import java.security.MessageDigest;
import java.security.PrivateKey;
import java.security.cert.Certificate;
import java.security.cert.CertificateFactory;
import java.security.spec.PKCS8EncodedKeySpec;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.time.Duration;
import java.util.HexFormat;
import java.util.Properties;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.TrustManagerFactory;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;

/**
 * The driver matrix's Java clients (tests/compat): pgjdbc and java.net.http.HttpClient through
 * the broker. Settings come from COMPAT_* environment variables (tests/compat/drivers.py);
 * every feature prints one JSON line {"feature", "ok", "detail"}.
 */
public final class Compat {
  interface Feature {
    String run() throws Exception;
  }

  static String env(String name) {
    String value = System.getenv(name);
    if (value == null || value.isEmpty()) {
      System.err.println(name + " is not set");
      System.exit(2);
    }
    return value;
  }

  static String json(String s) {
    StringBuilder out = new StringBuilder("\"");
    for (char c : s.toCharArray()) {
      if (c == '"' || c == '\\') {
        out.append('\\').append(c);
      } else if (c < 0x20) {
        out.append(String.format("\\u%04x", (int) c));
      } else {
        out.append(c);
      }
    }
    return out.append('"').toString();
  }

  static void step(String feature, Feature body) {
    boolean ok;
    String detail;
    try {
      String result = body.run();
      ok = true;
      detail = result == null ? "" : result;
    } catch (Exception e) {
      ok = false;
      detail = String.valueOf(e.getMessage());
    }
    System.out.println(
        "{\"feature\": " + json(feature) + ", \"ok\": " + ok + ", \"detail\": " + json(detail) + "}");
  }

  static void check(boolean condition, String why) {
    if (!condition) {
      throw new IllegalStateException(why);
    }
  }

  public static void main(String[] args) throws Exception {
    if (args.length != 1) {
      System.err.println("usage: compat.Compat pgjdbc|http");
      System.exit(2);
    }
    switch (args[0]) {
      case "pgjdbc" -> pgjdbc();
      case "http" -> http();
      default -> {
        System.err.println("unknown driver " + args[0]);
        System.exit(2);
      }
    }
  }

  // ------------------------------------------------------------------------------ pgjdbc

  static void pgjdbc() throws Exception {
    Connection[] holder = new Connection[1];
    step("connect", () -> {
      holder[0] = DriverManager.getConnection(env("COMPAT_JDBC_URL"), new Properties());
      return null;
    });
    Connection conn = holder[0];
    if (conn == null) {
      return;
    }
    step("prepared", () -> {
      try (PreparedStatement ps = conn.prepareStatement("SELECT ?::int + ?::int")) {
        for (int i = 0; i < 6; i++) { // past prepareThreshold (5): a server-side statement
          ps.setInt(1, 40);
          ps.setInt(2, 2);
          try (ResultSet rs = ps.executeQuery()) {
            rs.next();
            check(rs.getInt(1) == 42, "prepared statement gave " + rs.getInt(1));
          }
        }
      }
      return null;
    });
    step("transaction", () -> {
      try (Statement st = conn.createStatement()) {
        st.execute("CREATE TEMP TABLE compat (n int, s text)");
        conn.setAutoCommit(false);
        st.execute("INSERT INTO compat VALUES (1, 'rolled back')");
        conn.rollback();
        conn.setAutoCommit(true);
        try (ResultSet rs = st.executeQuery("SELECT count(*) FROM compat")) {
          rs.next();
          check(rs.getInt(1) == 0, "the rolled back row is there");
        }
      }
      return null;
    });
    step("copy", () -> {
      StringBuilder rows = new StringBuilder();
      for (int i = 0; i < 1000; i++) {
        rows.append(i).append("\trow ").append(i).append('\n');
      }
      CopyManager copy = conn.unwrap(PGConnection.class).getCopyAPI();
      long n = copy.copyIn("COPY compat FROM STDIN", new ByteArrayInputStream(rows.toString().getBytes()));
      check(n == 1000, "copied " + n + " rows");
      return null;
    });
    step("listen_notify", () -> {
      PGConnection pg = conn.unwrap(PGConnection.class);
      int pid;
      try (Statement st = conn.createStatement()) {
        st.execute("LISTEN compat");
        st.execute("NOTIFY compat, 'hello'");
        try (ResultSet rs = st.executeQuery("SELECT pg_backend_pid()")) {
          rs.next();
          pid = rs.getInt(1);
        }
      }
      PGNotification[] got = pg.getNotifications(10_000);
      check(got != null && got.length == 1, "no notification");
      check("hello".equals(got[0].getParameter()), "payload " + got[0].getParameter());
      check(got[0].getPID() == pid && pg.getBackendPID() == pid,
          "notification from " + got[0].getPID() + ", server pid " + pid + ", driver pid " + pg.getBackendPID());
      return null;
    });
    step("cancel", () -> {
      try (Statement st = conn.createStatement()) {
        st.setQueryTimeout(1); // pgjdbc sends a CancelRequest when it passes
        long started = System.nanoTime();
        try {
          st.execute("SELECT pg_sleep(20)");
        } catch (SQLException e) {
          check(System.nanoTime() - started < 10_000_000_000L, "cancelled only after 10 s");
          check("57014".equals(e.getSQLState()), "SQLSTATE " + e.getSQLState() + ": " + e.getMessage());
          return e.getMessage();
        }
        throw new IllegalStateException("pg_sleep(20) was not cancelled");
      }
    });
    step("large_result", () -> {
      try (Statement st = conn.createStatement();
          ResultSet rs = st.executeQuery("SELECT g, repeat('x', 100) FROM generate_series(1, 100000) g")) {
        int n = 0;
        while (rs.next()) {
          n++;
        }
        check(n == 100000, "large result had " + n + " rows");
      }
      return null;
    });
    conn.close();
    step("denied", () -> {
      try (Connection denied = DriverManager.getConnection(env("COMPAT_DENIED_JDBC_URL"), new Properties())) {
        throw new IllegalStateException("the denied identity connected");
      } catch (SQLException e) {
        return e.getMessage();
      }
    });
  }

  // ------------------------------------------------------------------------------ HttpClient

  static SSLContext sslContext(String certEnv, String keyEnv) throws Exception {
    CertificateFactory x509 = CertificateFactory.getInstance("X.509");
    KeyStore trust = KeyStore.getInstance("PKCS12");
    trust.load(null, null);
    int i = 0;
    try (InputStream in = Files.newInputStream(Path.of(env("COMPAT_CA")))) {
      for (Certificate ca : x509.generateCertificates(in)) {
        trust.setCertificateEntry("ca" + i++, ca);
      }
    }
    Certificate[] chain;
    try (InputStream in = Files.newInputStream(Path.of(env(certEnv)))) {
      chain = x509.generateCertificates(in).toArray(new Certificate[0]);
    }
    // The SVID's key as PKCS#8 DER (openssl pkcs8 -topk8 -nocrypt -outform DER), as pgjdbc takes it.
    byte[] der = Files.readAllBytes(Path.of(env(keyEnv)));
    String algorithm = chain[0].getPublicKey().getAlgorithm();
    PrivateKey key = KeyFactory.getInstance(algorithm).generatePrivate(new PKCS8EncodedKeySpec(der));
    KeyStore keys = KeyStore.getInstance("PKCS12");
    keys.load(null, null);
    keys.setKeyEntry("svid", key, new char[0], chain);
    KeyManagerFactory kmf = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
    kmf.init(keys, new char[0]);
    TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
    tmf.init(trust);
    SSLContext ctx = SSLContext.getInstance("TLS");
    ctx.init(kmf.getKeyManagers(), tmf.getTrustManagers(), null);
    return ctx;
  }

  static HttpClient client(String certEnv, String keyEnv) throws Exception {
    return HttpClient.newBuilder()
        .sslContext(sslContext(certEnv, keyEnv))
        .version(HttpClient.Version.HTTP_1_1)
        .connectTimeout(Duration.ofSeconds(30))
        .build();
  }

  static void http() throws Exception {
    String base = env("COMPAT_URL");
    HttpClient client = client("COMPAT_CERT", "COMPAT_KEY_DER");
    step("get", () -> {
      HttpResponse<String> res = client.send(
          HttpRequest.newBuilder(URI.create(base + "/compat/get")).build(), HttpResponse.BodyHandlers.ofString());
      check(res.statusCode() == 200 && res.body().contains("/compat/get"), res.statusCode() + " " + res.body());
      return null;
    });
    step("post", () -> {
      HttpResponse<String> res = client.send(
          HttpRequest.newBuilder(URI.create(base + "/compat/post"))
              .header("Content-Type", "application/json")
              .POST(HttpRequest.BodyPublishers.ofString("{\"n\": 42}"))
              .build(),
          HttpResponse.BodyHandlers.ofString());
      check(res.statusCode() == 200 && res.body().contains("{\\\"n\\\": 42}"), res.statusCode() + " " + res.body());
      return null;
    });
    step("large_result", () -> {
      HttpResponse<InputStream> res = client.send(
          HttpRequest.newBuilder(URI.create(base + "/download?size=10000000")).build(),
          HttpResponse.BodyHandlers.ofInputStream());
      MessageDigest digest = MessageDigest.getInstance("SHA-256");
      try (InputStream in = res.body()) {
        byte[] buffer = new byte[65536];
        int n;
        while ((n = in.read(buffer)) > 0) {
          digest.update(buffer, 0, n);
        }
      }
      check(res.statusCode() == 200, "status " + res.statusCode());
      return HexFormat.of().formatHex(digest.digest());
    });
    HttpClient denied = client("COMPAT_DENIED_CERT", "COMPAT_DENIED_KEY_DER");
    step("denied", () -> {
      HttpResponse<String> res = denied.send(
          HttpRequest.newBuilder(URI.create(base + "/compat/denied")).build(), HttpResponse.BodyHandlers.ofString());
      check(res.statusCode() == 403, "status " + res.statusCode());
      return res.body();
    });
  }
}
